//! Reads the [`State`] at scrape time and writes it as typed metric families.
//!
//! Names follow cAdvisor where it has one (`container_network_receive_bytes_total`,
//! `container_cpu_usage_seconds_total`, `container_memory_working_set_bytes`,
//! `container_spec_memory_limit_bytes`), under the `observer_` prefix the registry adds.
//! A family with no series is left out, as the Go client does.

use std::sync::{Arc, Mutex};

use observer_common::Counter;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, LabelSetEncoder},
    metrics::{counter::ConstCounter, gauge::ConstGauge, TypedMetric},
    registry::Unit,
};

use super::{
    labels::{InterfaceClass, SinkLabel, SourceLabel},
    state::{State, Totals, TrafficTotals},
};

/// The registered collector: a handle on the state the sink updates.
#[derive(Debug)]
pub struct StateCollector(pub Arc<Mutex<State>>);

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // A sink that panicked mid-update leaves totals that are still worth showing.
        let state = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let e = &mut encoder;
        group(
            e,
            "container",
            state.containers.iter().map(|(k, v)| (k, &v.totals)),
        )?;
        family(
            e,
            "container_info",
            "Facts of each live container (value 1): runtime id, image, network mode.",
            None,
            state
                .containers
                .iter()
                .map(|(k, v)| (Join(k, &v.info), ConstGauge::new(1i64))),
        )?;
        group(
            e,
            "workload",
            state.workloads.iter().map(|(k, v)| (k, &v.totals)),
        )?;
        family(
            e,
            "workload_info",
            "Facts of each live task, pod or project (value 1): owner, network mode.",
            None,
            state
                .workloads
                .iter()
                .map(|(k, v)| (Join(k, &v.info), ConstGauge::new(1i64))),
        )?;
        traffic(
            e,
            "host",
            "cgroups that belong to no container or workload (host processes)",
            [(&Nil, &state.host)].into_iter(),
        )?;
        own(e, &state)
    }
}

/// Traffic, CPU and memory families of containers or workloads (`what`).
fn group<'a, S: EncodeLabelSet + 'a>(
    e: &mut DescriptorEncoder,
    what: &str,
    series: impl Iterator<Item = (&'a S, &'a Totals)> + Clone,
) -> std::fmt::Result {
    let who = format!("each live {what}");
    traffic(e, what, &who, series.clone().map(|(k, t)| (k, &t.traffic)))?;
    family(
        e,
        &format!("{what}_cpu_usage"),
        &format!("CPU time of {who}: each interval's CPU share times its length, from its second interval on."),
        Some(&Unit::Seconds),
        series
            .clone()
            .filter_map(|(k, t)| Some((Join(k, &Nil), ConstCounter::new(t.cpu_seconds?)))),
    )?;
    family(
        e,
        &format!("{what}_memory_working_set"),
        &format!("Memory in use by {who}, without inactive page cache."),
        Some(&Unit::Bytes),
        series.clone().filter_map(|(k, t)| {
            Some((Join(k, &Nil), ConstGauge::new(t.usage.memory_working_set?)))
        }),
    )?;
    family(
        e,
        &format!("{what}_spec_cpu_limit"),
        &format!("CPU limit of {who}, in cores."),
        Some(&Unit::Other("cores".into())),
        series
            .clone()
            .filter_map(|(k, t)| Some((Join(k, &Nil), ConstGauge::new(t.usage.cpu_limit_cores?)))),
    )?;
    family(
        e,
        &format!("{what}_spec_memory_limit"),
        &format!("Memory limit of {who}."),
        Some(&Unit::Bytes),
        series.filter_map(|(k, t)| Some((Join(k, &Nil), ConstGauge::new(t.usage.memory_limit?)))),
    )
}

/// The four traffic families (receive/transmit x bytes/packets) of `what`, each series split
/// by `interface_class`.
fn traffic<'a, S: EncodeLabelSet + 'a>(
    e: &mut DescriptorEncoder,
    what: &str,
    who: &str,
    series: impl Iterator<Item = (&'a S, &'a TrafficTotals)> + Clone,
) -> std::fmt::Result {
    type Pick = fn(&TrafficTotals) -> (Counter, Counter);
    let directions: [(&str, &str, Pick); 2] = [
        ("receive", "received", |t| (t.0.rx, t.0.lo_rx)),
        ("transmit", "sent", |t| (t.0.tx, t.0.lo_tx)),
    ];
    for (direction, verb, pick) in directions {
        let split = |bytes: bool| {
            series.clone().flat_map(move |(k, t)| {
                let (device, loopback) = pick(t);
                let value = |c: Counter| if bytes { c.bytes } else { c.packets };
                [
                    (
                        Join(k, &InterfaceClass::DEVICE),
                        ConstCounter::new(value(device)),
                    ),
                    (
                        Join(k, &InterfaceClass::LOOPBACK),
                        ConstCounter::new(value(loopback)),
                    ),
                ]
            })
        };
        family(
            e,
            &format!("{what}_network_{direction}"),
            &format!("IP bytes {verb} by {who}, loopback apart."),
            Some(&Unit::Bytes),
            split(true),
        )?;
        family(
            e,
            &format!("{what}_network_{direction}_packets"),
            &format!("Packets {verb} by {who}, loopback apart; a GSO batch counts once."),
            None,
            split(false),
        )?;
    }
    Ok(())
}

/// observer's own families.
fn own(e: &mut DescriptorEncoder, state: &State) -> std::fmt::Result {
    let own = &state.own;
    single(
        e,
        "programs_attached",
        "Kernel programs observer has attached.",
        None,
        Some(ConstGauge::new(own.programs_attached)),
    )?;
    single(
        e,
        "traffic_map_entries",
        "Entries of the kernel's traffic map after the latest interval.",
        None,
        Some(ConstGauge::new(own.map_entries)),
    )?;
    single(
        e,
        "traffic_map_capacity",
        "Entries the kernel's traffic map can hold.",
        None,
        Some(ConstGauge::new(own.map_capacity)),
    )?;
    single(
        e,
        "traffic_map_full_drops",
        "Packets not counted because the traffic map was full.",
        None,
        Some(ConstCounter::new(own.map_full_drops)),
    )?;
    single(
        e,
        "metadata_api_errors",
        "Failed calls to the platform's metadata API (ECS agent, kubelet, Docker).",
        None,
        Some(ConstCounter::new(own.metadata_api_errors)),
    )?;
    family(
        e,
        "inventory_stale",
        "1 while the metadata API fails and workloads are the last good answer, else 0.",
        None,
        own.inventory.map(|i| {
            let source = SourceLabel { source: i.source };
            (source, ConstGauge::new(i64::from(i.stale)))
        }),
    )?;
    family(
        e,
        "inventory_unlisted_workloads",
        "Workloads the metadata API no longer lists while their cgroups still hold processes: kept, \
         their traffic still their own.",
        None,
        own.inventory.map(|i| {
            let source = SourceLabel { source: i.source };
            (source, ConstGauge::new(i.unlisted as i64))
        }),
    )?;
    single(
        e,
        "mackerel_queue_depth",
        "Values waiting to be posted to Mackerel.",
        None,
        own.mackerel_queue_depth.map(ConstGauge::new),
    )?;
    single(
        e,
        "mackerel_dropped_values",
        "Values dropped unsent because the Mackerel API did not take them within the buffer's bounds (--mackerel-buffer, 6 h of data).",
        None,
        own.mackerel_dropped_values.map(ConstCounter::new),
    )?;
    family(
        e,
        "sink_dropped",
        "Intervals an output could not take because it was still delivering earlier ones.",
        None,
        own.sinks
            .iter()
            .map(|s| (SinkLabel { sink: s.name }, ConstCounter::new(s.dropped))),
    )?;
    single(
        e,
        "cycles",
        "Intervals measured and reported since start.",
        None,
        Some(ConstCounter::new(own.cycles)),
    )?;
    let last = own
        .last_cycle_time
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
    single(
        e,
        "last_cycle_timestamp",
        "End of the latest interval measured, in seconds since the epoch.",
        Some(&Unit::Seconds),
        last.map(|d| ConstGauge::new(d.as_secs_f64())),
    )
}

/// One family: its descriptor, then a sample per label set. Nothing at all when there are no
/// series.
fn family<S, M>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    series: impl IntoIterator<Item = (S, M)>,
) -> std::fmt::Result
where
    S: EncodeLabelSet,
    M: EncodeMetric + TypedMetric,
{
    let mut series = series.into_iter().peekable();
    if series.peek().is_none() {
        return Ok(());
    }
    let mut metric = e.encode_descriptor(name, help, unit, M::TYPE)?;
    for (labels, value) in series {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A family of one sample without labels, or nothing when there is no value.
fn single<M: EncodeMetric + TypedMetric>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: Option<M>,
) -> std::fmt::Result {
    match value {
        Some(value) => value.encode(e.encode_descriptor(name, help, unit, M::TYPE)?),
        None => Ok(()),
    }
}

/// Two borrowed label sets, one after the other (the crate's tuple impl wants owned ones).
struct Join<'a, A, B>(&'a A, &'a B);

impl<A: EncodeLabelSet, B: EncodeLabelSet> EncodeLabelSet for Join<'_, A, B> {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)?;
        self.1.encode(encoder)
    }
}

/// No labels.
struct Nil;

impl EncodeLabelSet for Nil {
    fn encode(&self, _: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        Ok(())
    }
}
