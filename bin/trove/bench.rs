//! `trove bench`: the README's figures in one run, a table or JSON lines; memcpy and a local
//! sum measured beside the figures they are compared to.

use std::hint::black_box;
use std::io::Write;
use std::time::{Duration, Instant};

use trove::ObjectRef;

use crate::stories::{actors, large_objects::Summer};
use crate::user_paths::{Worker, median, warm_memcpy_gbps};

/// The figures of one run: printed as they are measured (JSON lines), or as a table at the
/// end. Shared by `bench` and `bench --ray` (`ray_bench.rs`).
pub(crate) struct Report<'a> {
    out: &'a mut dyn Write,
    json: bool,
    /// The titles of the table's first and last columns.
    titles: (&'static str, String),
    rows: Vec<Row>,
}

struct Row {
    name: String,
    /// `None`: the figure cannot be measured (n/a); `note` says why.
    value: Option<f64>,
    unit: &'static str,
    note: String,
}

impl<'a> Report<'a> {
    pub(crate) fn new(
        out: &'a mut dyn Write,
        json: bool,
        titles: (&'static str, impl Into<String>),
    ) -> Report<'a> {
        Report {
            out,
            json,
            titles: (titles.0, titles.1.into()),
            rows: Vec::new(),
        }
    }

    pub(crate) fn add(
        &mut self,
        name: &str,
        value: f64,
        unit: &'static str,
        baseline: Option<String>,
    ) -> std::io::Result<()> {
        self.add_row(name, Some(value), unit, baseline.unwrap_or_default(), &[])
    }

    /// A row: `value` `None` is "n/a" and `note` the reason (JSON: `"value": null` and
    /// `"reason"`); `extra` are more numeric fields of the JSON line (not of the table, where
    /// `note` says what it needs to).
    pub(crate) fn add_row(
        &mut self,
        name: &str,
        value: Option<f64>,
        unit: &'static str,
        note: String,
        extra: &[(&str, f64)],
    ) -> std::io::Result<()> {
        if self.json {
            let mut line = format!(
                "{{\"name\": {}, \"value\": {}, \"unit\": {}",
                json_str(name),
                json_num(value),
                json_str(unit)
            );
            for (k, v) in extra {
                line += &format!(", {}: {}", json_str(k), json_num(Some(*v)));
            }
            if value.is_none() {
                line += &format!(", \"reason\": {}", json_str(&note));
            }
            writeln!(self.out, "{line}}}")?;
            self.out.flush()?;
        } else {
            eprint!("\r\x1b[K  measured {name}");
        }
        self.rows.push(Row {
            name: name.to_string(),
            value,
            unit,
            note,
        });
        Ok(())
    }

    pub(crate) fn table(&mut self) -> std::io::Result<()> {
        if self.json {
            return Ok(());
        }
        eprintln!("\r\x1b[K");
        let w = self
            .rows
            .iter()
            .map(|r| r.name.len())
            .max()
            .unwrap_or(0)
            .max(26);
        let u = self
            .rows
            .iter()
            .map(|r| r.unit.len())
            .max()
            .unwrap_or(0)
            .max(8);
        let (first, last) = (self.titles.0, &self.titles.1);
        writeln!(
            self.out,
            "{first:<w$} {:>14} {:<u$} {last}",
            "value", "unit"
        )?;
        for Row {
            name,
            value,
            unit,
            note,
        } in &self.rows
        {
            let value = value.map_or_else(|| "n/a".to_string(), |v| format!("{v:.3}"));
            writeln!(self.out, "{name:<w$} {value:>14} {unit:<u$} {note}")?;
        }
        self.out.flush()
    }

    /// A line under the table (nothing in JSON mode).
    pub(crate) fn footnote(&mut self, text: &str) -> std::io::Result<()> {
        if !self.json {
            writeln!(self.out, "{text}")?;
        }
        Ok(())
    }
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o += "\\\"",
            '\\' => o += "\\\\",
            c if (c as u32) < 0x20 => o += &format!("\\u{:04x}", c as u32),
            c => o.push(c),
        }
    }
    o + "\""
}

fn json_num(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() => v.to_string(),
        _ => "null".into(),
    }
}

pub(crate) fn progress(json: bool, what: &str) {
    if !json {
        eprint!("\r\x1b[K  running {what} ...");
    }
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Small {
    id: u64,
    name: String,
    samples: Vec<u32>,
}

pub fn run(
    rt: &trove::Runtime,
    quick: bool,
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let reps = if quick { 3 } else { 7 };
    let mut r = Report::new(out, json, ("figure", "baseline"));
    rt.store().populate()?;
    const GIB: usize = 1 << 30;

    progress(json, "memcpy 1 GiB");
    let src = vec![0x5au8; GIB];
    let mut dst = vec![0u8; GIB];
    dst.copy_from_slice(&src);
    let memcpy = warm_memcpy_gbps(&src, &mut dst, reps);
    drop(dst);
    r.add("memcpy_GBps", memcpy, "GB/s", None)?;

    progress(json, "put 1 GiB");
    let mut puts = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        let o = rt.put_slice(black_box(&src[..]))?;
        puts.push(GIB as f64 / t.elapsed().as_secs_f64() / 1e9);
        drop(o);
    }
    let put = median(puts);
    r.add(
        "put_1GiB_GBps",
        put,
        "GB/s",
        Some(format!("memcpy {memcpy:.2} GB/s")),
    )?;
    r.add(
        "put_1GiB_ratio",
        put / memcpy,
        "x",
        Some("of memcpy".into()),
    )?;

    progress(json, "get 1 GiB");
    let big = rt.put_slice(&src[..])?;
    drop(src);
    let n = if quick { 20_000 } else { 200_000 };
    let t = Instant::now();
    for _ in 0..n {
        black_box(big.get()?.len());
    }
    r.add(
        "get_1GiB_us",
        t.elapsed().as_secs_f64() * 1e6 / n as f64,
        "us",
        None,
    )?;
    drop(big);

    progress(json, "small puts");
    let n = if quick { 20_000 } else { 200_000 };
    let values: Vec<Small> = (0..n as u64)
        .map(|i| Small {
            id: i,
            name: format!("sample number {i:>16}"),
            samples: (0..8).collect(),
        })
        .collect();
    let mut refs = Vec::with_capacity(n);
    let t = Instant::now();
    for v in &values {
        refs.push(rt.put(v)?);
    }
    rt.store().stats()?; // until the daemon has handled them all
    r.add(
        "small_put_per_s",
        n as f64 / t.elapsed().as_secs_f64(),
        "1/s",
        None,
    )?;

    progress(json, "small gets");
    let one = &refs[0];
    let m = if quick { 200_000 } else { 2_000_000 };
    let t = Instant::now();
    for _ in 0..m {
        black_box(one.get()?.id.to_native());
    }
    r.add(
        "small_get_per_s",
        m as f64 / t.elapsed().as_secs_f64(),
        "1/s",
        None,
    )?;
    drop(refs);

    progress(json, "actor calls");
    let a = rt.actor(Worker::default)?;
    // Warm-up (untimed), as the criterion benches do: the first calls grow this process's
    // maps and fault in fresh pages.
    for _ in 0..2 {
        let refs: Vec<_> = (0..10_000)
            .map(|_| a.call(Worker::inc, ()))
            .collect::<Result<_, _>>()?;
        refs.last().expect("10,000").get()?;
    }
    let n = if quick { 5_000 } else { 50_000 };
    let t = Instant::now();
    for _ in 0..n {
        black_box(*a.call(Worker::inc, ())?.get()?);
    }
    r.add(
        "actor_sync_calls_per_s",
        n as f64 / t.elapsed().as_secs_f64(),
        "1/s",
        None,
    )?;
    let batches = if quick { 2 } else { 10 };
    let t = Instant::now();
    for _ in 0..batches {
        let refs: Vec<_> = (0..10_000)
            .map(|_| a.call(Worker::inc, ()))
            .collect::<Result<_, _>>()?;
        black_box(*refs.last().expect("10,000").get()?);
    }
    r.add(
        "actor_async_calls_per_s",
        (batches * 10_000) as f64 / t.elapsed().as_secs_f64(),
        "1/s",
        None,
    )?;

    progress(json, "sum of 256 MiB");
    let summer = rt.actor(Summer::new)?;
    let big: ObjectRef<Vec<f64>> = rt.put(&vec![1.0f64; 32 << 20])?;
    let mut ratios = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        black_box(big.get()?.iter().map(|x| x.to_native()).sum::<f64>());
        let local = t.elapsed().as_secs_f64();
        let t = Instant::now();
        black_box(*summer.call(Summer::sum, (big.clone(),))?.get()?);
        ratios.push(t.elapsed().as_secs_f64() / local);
    }
    r.add(
        "actor_sum_256MiB_ratio",
        median(ratios),
        "x",
        Some("of a local sum".into()),
    )?;
    drop(big);
    rt.kill(&summer)?;
    rt.kill(&a)?;

    progress(json, "actor creation");
    let n = if quick { 5 } else { 20 };
    let mut total = Duration::ZERO;
    for _ in 0..n {
        let t = Instant::now();
        let h = rt.actor(Worker::default)?;
        total += t.elapsed();
        h.call(Worker::inc, ())?.get()?;
        rt.kill(&h)?;
    }
    r.add(
        "actor_create_ms",
        total.as_secs_f64() * 1e3 / n as f64,
        "ms",
        None,
    )?;

    progress(json, "seed exercise 4");
    let s = actors::run(rt, &mut std::io::sink())?;
    r.add("seed_ex4_s", s, "s", Some("5 s serially".into()))?;
    r.table()?;
    Ok(())
}
