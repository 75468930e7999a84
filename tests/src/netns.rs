//! A network namespace made by a test, optionally joined to the host by a veth pair with
//! addresses in 10.201.<n>.0/30. Deleting the namespace deletes the veth with it.

use std::{
    fs::File,
    net::Ipv4Addr,
    sync::atomic::{AtomicU32, Ordering},
};

use crate::sh;

pub struct NetNs {
    name: String,
    veth: Option<Veth>,
}

pub struct Veth {
    pub host_if: String,
    pub ns_if: String,
    pub host_addr: Ipv4Addr,
    pub ns_addr: Ipv4Addr,
}

impl NetNs {
    /// A namespace with only its loopback, up.
    pub fn new(label: &str) -> anyhow::Result<Self> {
        let name = crate::unique(&format!("obs-{label}"));
        sh("ip", &["netns", "add", &name])?;
        let ns = Self { name, veth: None };
        sh("ip", &["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A namespace joined to the host netns by a veth pair. Neighbours are static, so no ARP
    /// round trip delays or drops the first packets.
    pub fn with_veth(label: &str) -> anyhow::Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let mut ns = Self::new(label)?;
        let n = (std::process::id() + NEXT.fetch_add(1, Ordering::Relaxed)) % 250 + 1;
        let tag = format!("{}{}", std::process::id() % 10_000, n);
        let (host_if, ns_if) = (format!("obh{tag}"), format!("obn{tag}"));
        let (host_mac, ns_mac) = (
            format!("02:0b:5e:00:{:02x}:01", n),
            format!("02:0b:5e:00:{:02x}:02", n),
        );
        let host_addr = Ipv4Addr::new(10, 201, n as u8, 1);
        let ns_addr = Ipv4Addr::new(10, 201, n as u8, 2);
        sh(
            "ip",
            &[
                "link", "add", &host_if, "address", &host_mac, "type", "veth", "peer", "name",
                &ns_if, "address", &ns_mac, "netns", &ns.name,
            ],
        )?;
        ns.veth = Some(Veth {
            host_if: host_if.clone(),
            ns_if: ns_if.clone(),
            host_addr,
            ns_addr,
        });
        sh(
            "ip",
            &["addr", "add", &format!("{host_addr}/30"), "dev", &host_if],
        )?;
        sh("ip", &["link", "set", &host_if, "up"])?;
        sh(
            "ip",
            &[
                "-n",
                &ns.name,
                "addr",
                "add",
                &format!("{ns_addr}/30"),
                "dev",
                &ns_if,
            ],
        )?;
        sh("ip", &["-n", &ns.name, "link", "set", &ns_if, "up"])?;
        sh(
            "ip",
            &[
                "neigh",
                "replace",
                &ns_addr.to_string(),
                "lladdr",
                &ns_mac,
                "dev",
                &host_if,
                "nud",
                "permanent",
            ],
        )?;
        sh(
            "ip",
            &[
                "-n",
                &ns.name,
                "neigh",
                "replace",
                &host_addr.to_string(),
                "lladdr",
                &host_mac,
                "dev",
                &ns_if,
                "nud",
                "permanent",
            ],
        )?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn veth(&self) -> &Veth {
        self.veth.as_ref().expect("namespace made with_veth")
    }

    /// A handle for setns(2).
    pub fn open(&self) -> anyhow::Result<File> {
        Ok(File::open(format!("/run/netns/{}", self.name))?)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Some(v) = &self.veth {
            let _ = sh("ip", &["link", "del", &v.host_if]);
        }
        if let Err(e) = sh("ip", &["netns", "del", &self.name]) {
            eprintln!("could not delete netns {}: {e}", self.name);
        }
    }
}
