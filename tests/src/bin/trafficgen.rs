//! Sends and receives known traffic for observer's tests and benchmark. Receivers print
//! `ready <addr>` once bound, so the caller knows when to start the sender.
//!
//!   trafficgen udp-recv <bind> <count> [idle_ms]   prints "received <datagrams> <bytes>"
//!   trafficgen udp-send <dest> <count> <payload>    prints "sent <datagrams>"
//!   trafficgen udp-flood <dest> <seconds> <payload> prints "sent <datagrams>"
//!   trafficgen tcp-recv <bind>                      prints "received <bytes>"
//!   trafficgen tcp-send <dest> <bytes>              prints "sent <bytes>"
//!   trafficgen tcp-flood <dest> <seconds>           prints "sent <bytes>"
//!   trafficgen udp-each <dest> <payload>            for each cgroup directory read from stdin:
//!                                                   join it, send one datagram from a new
//!                                                   socket; prints "sent <datagrams>"
//!   trafficgen http-sink <bind>                     HTTP/1.1 server: reads each request's
//!                                                   body (Content-Length), answers 200 and
//!                                                   prints "got <body bytes>"

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| -> &str { args.get(i).map(String::as_str).unwrap_or_else(|| usage()) };
    let num = |i: usize| -> u64 { arg(i).parse().unwrap_or_else(|_| usage()) };
    let addr = |i: usize| -> SocketAddr { arg(i).parse().unwrap_or_else(|_| usage()) };
    match arg(0) {
        "udp-recv" => udp_recv(addr(1), num(2), args.get(3).map_or(2000, |_| num(3))),
        "udp-send" => udp_send(addr(1), Limit::Count(num(2)), num(3) as usize),
        "udp-flood" => udp_send(
            addr(1),
            Limit::Time(Duration::from_secs(num(2))),
            num(3) as usize,
        ),
        "tcp-recv" => tcp_recv(addr(1)),
        "tcp-send" => tcp_send(addr(1), Limit::Count(num(2))),
        "tcp-flood" => tcp_send(addr(1), Limit::Time(Duration::from_secs(num(2)))),
        "udp-each" => udp_each(addr(1), num(2) as usize),
        "http-sink" => http_sink(addr(1)),
        _ => usage(),
    }
}

fn usage() -> ! {
    eprintln!("usage: trafficgen udp-recv|udp-send|udp-flood|tcp-recv|tcp-send|tcp-flood|udp-each|http-sink ...");
    std::process::exit(2)
}

enum Limit {
    Count(u64),
    Time(Duration),
}

fn ready(addr: SocketAddr) {
    println!("ready {addr}");
    std::io::stdout().flush().unwrap();
}

/// A receive buffer big enough that a slow receiver (a QEMU guest without KVM) drops nothing.
/// SO_RCVBUF is capped by net.core.rmem_max (208 KiB by default, under 100 datagrams of 1 KB);
/// SO_RCVBUFFORCE, which root may use, is not.
fn set_rcvbuf(fd: i32, bytes: i32) {
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: plain setsockopt on a socket we own; failure only means a smaller buffer.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                &bytes as *const i32 as *const libc::c_void,
                size_of::<i32>() as u32,
            )
        };
        if rc == 0 {
            return;
        }
    }
}

fn udp_recv(bind: SocketAddr, count: u64, idle_ms: u64) {
    let socket = UdpSocket::bind(bind).expect("bind");
    set_rcvbuf(socket.as_raw_fd(), 8 << 20);
    socket
        .set_read_timeout(Some(Duration::from_millis(idle_ms)))
        .unwrap();
    ready(socket.local_addr().unwrap());
    let (mut n, mut bytes) = (0u64, 0u64);
    let mut buf = vec![0u8; 65536];
    while n < count {
        match socket.recv(&mut buf) {
            Ok(len) => {
                n += 1;
                bytes += len as u64;
            }
            Err(_) => break, // idle: the sender is done
        }
    }
    println!("received {n} {bytes}");
}

fn udp_send(dest: SocketAddr, limit: Limit, payload: usize) {
    let local: SocketAddr = if dest.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let socket = UdpSocket::bind(local).expect("bind");
    let buf = vec![0x5au8; payload];
    let start = Instant::now();
    let mut sent = 0u64;
    loop {
        match limit {
            Limit::Count(n) if sent >= n => break,
            Limit::Time(d) if sent.is_multiple_of(64) && start.elapsed() >= d => break,
            _ => {}
        }
        // Only successful sends count: a failed send never reached the egress hook.
        match socket.send_to(&buf, dest) {
            Ok(_) => sent += 1,
            Err(_) => std::thread::yield_now(),
        }
    }
    report(sent, &limit, start);
}

/// "sent <n>", plus the seconds it took when sending for a time.
fn report(sent: u64, limit: &Limit, start: Instant) {
    match limit {
        Limit::Count(_) => println!("sent {sent}"),
        Limit::Time(_) => println!("sent {sent} {:.6}", start.elapsed().as_secs_f64()),
    }
}

fn tcp_recv(bind: SocketAddr) {
    let listener = TcpListener::bind(bind).expect("bind");
    ready(listener.local_addr().unwrap());
    let (mut stream, _) = listener.accept().expect("accept");
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) => panic!("read: {e}"),
        }
    }
    println!("received {total}");
}

fn tcp_send(dest: SocketAddr, limit: Limit) {
    let mut stream = TcpStream::connect(dest).expect("connect");
    let chunk = vec![0xa5u8; 1 << 16];
    let start = Instant::now();
    let mut sent = 0u64;
    loop {
        let n = match limit {
            Limit::Count(total) if sent >= total => break,
            Limit::Count(total) => chunk.len().min((total - sent) as usize),
            Limit::Time(d) if start.elapsed() >= d => break,
            Limit::Time(_) => chunk.len(),
        };
        stream.write_all(&chunk[..n]).expect("write");
        sent += n as u64;
    }
    stream.shutdown(Shutdown::Write).unwrap();
    // Wait for the receiver to close, so every byte has passed both hooks when we exit.
    let _ = stream.read(&mut [0u8; 1]);
    report(sent, &limit, start);
}

/// One datagram from each cgroup named on stdin: a socket belongs to the cgroup its maker was in
/// when it was made, so join first, then make the socket.
fn udp_each(dest: SocketAddr, payload: usize) {
    use std::io::BufRead;
    let buf = vec![0x11u8; payload];
    let mut sent = 0u64;
    for dir in std::io::stdin().lock().lines() {
        let dir = dir.expect("stdin");
        std::fs::write(format!("{dir}/cgroup.procs"), b"0").expect("join cgroup");
        let socket = UdpSocket::bind("0.0.0.0:0").expect("bind");
        socket.send_to(&buf, dest).expect("send");
        sent += 1;
    }
    println!("sent {sent}");
}

/// An HTTP sink: for every connection, reads the request head up to the blank line, then
/// exactly Content-Length body bytes, answers `200 OK` with an empty body and closes; prints
/// "got <body bytes>" per request. Each connection has a thread of its own.
fn http_sink(bind: SocketAddr) {
    let listener = TcpListener::bind(bind).expect("bind");
    ready(listener.local_addr().unwrap());
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        std::thread::spawn(move || match http_request(stream) {
            Ok(n) => {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "got {n}");
                let _ = out.flush();
            }
            Err(e) => eprintln!("http-sink: {e}"),
        });
    }
}

fn http_request(mut stream: TcpStream) -> std::io::Result<u64> {
    use std::io::{Error, ErrorKind};
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    // Read in chunks; whatever follows the head is the start of the body.
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 1 << 16];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 << 10 {
            return Err(Error::new(
                ErrorKind::InvalidData,
                "request head over 64 KiB",
            ));
        }
        match stream.read(&mut chunk)? {
            0 => return Err(Error::new(ErrorKind::UnexpectedEof, "closed in the head")),
            n => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let length: u64 = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut got = (buf.len() - head_end) as u64;
    if got > length {
        return Err(Error::new(
            ErrorKind::InvalidData,
            "more bytes than Content-Length",
        ));
    }
    while got < length {
        let want = chunk.len().min((length - got) as usize);
        match stream.read(&mut chunk[..want])? {
            0 => return Err(Error::new(ErrorKind::UnexpectedEof, "closed in the body")),
            n => got += n as u64,
        }
    }
    stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    stream.flush()?;
    let _ = stream.shutdown(Shutdown::Write);
    Ok(got)
}
