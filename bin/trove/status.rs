//! `status`, `put` and `get`: a plain `StoreClient` against a running `troved`.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use trove_store::{ObjectId, StoreClient, Timeout};

/// The store's figures, and with `objects` one line per object.
pub fn status(c: &StoreClient, objects: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let s = c.stats()?;
    let size = trove_store::size::format_size;
    writeln!(out, "store      {}", c.socket_path().display())?;
    writeln!(out, "capacity   {}", size(s.capacity))?;
    writeln!(
        out,
        "used       {} ({:.1}%)",
        size(s.used),
        100.0 * s.used as f64 / s.capacity.max(1) as f64
    )?;
    writeln!(out, "pinned     {}", size(s.pinned))?;
    writeln!(out, "reserved   {} (client slabs)", size(s.reserved))?;
    writeln!(out, "objects    {} ({} sealed)", s.objects, s.sealed)?;
    writeln!(out, "clients    {} (this one included)", s.clients)?;
    writeln!(out, "evictions  {}", s.evictions)?;
    if objects {
        writeln!(out)?;
        writeln!(
            out,
            "{:<40} {:>10} {:<9} {:>4} {:>8}",
            "id", "size", "state", "pins", "age"
        )?;
        for o in c.list()? {
            writeln!(
                out,
                "{:<40} {:>10} {:<9} {:>4} {:>7.1}s",
                o.id.to_string(),
                size(o.size),
                format!("{:?}", o.state),
                o.pins,
                o.age.as_secs_f64()
            )?;
        }
    }
    out.flush()?;
    Ok(())
}

/// Stores `file` as a new object; prints its id.
pub fn put(c: &StoreClient, file: &Path, out: &mut dyn Write) -> anyhow::Result<()> {
    let data = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let id = ObjectId::random();
    c.put(id, &data)?;
    writeln!(out, "{id}")?;
    out.flush()?;
    Ok(())
}

/// Writes object `id` to `output`, or to `out`.
pub fn get(
    c: &StoreClient,
    id: &str,
    output: Option<&Path>,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let id: ObjectId = id.parse().map_err(|e| anyhow::anyhow!("bad id: {e}"))?;
    let view = c.get(id, Timeout::Poll)?;
    match output {
        Some(p) => std::fs::write(p, &*view).with_context(|| format!("writing {}", p.display()))?,
        None => {
            out.write_all(&view)?;
            out.flush()?;
        }
    }
    Ok(())
}
