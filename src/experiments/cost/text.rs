//! Text: the human-readable report and its number formats.

use indicatif::HumanBytes;

use super::{Estimate, Path};

/// 1234567 -> "1.235 M" (k, M, G, T, P; SI). Hand-written: indicatif's `HumanCount` prints all
/// the digits with thousands separators ("1,234,567"), too wide for the report's columns.
pub fn si(v: f64) -> String {
    let units = [("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)];
    match units.iter().find(|(_, s)| v.abs() >= *s) {
        Some((u, s)) => format!("{:.3} {u}", v / s),
        None => format!("{v:.0} "),
    }
}

/// Bytes as "1.46 KiB", "2.00 GiB" (indicatif's `HumanBytes`; the counts are whole bytes held
/// in f64 sums, rounded). A String: `HumanBytes` ignores the width of the report's columns.
pub fn binary_bytes(v: f64) -> String {
    HumanBytes(v.round() as u64).to_string()
}

/// Seconds as "850 us", "1.24 s", "3 m 05 s", "2 h 11 m". Hand-written: indicatif's
/// `HumanDuration` rounds to one unit in words ("3 minutes") and has nothing below a second,
/// where most estimated calls fall.
pub fn duration(s: f64) -> String {
    if s < 1e-3 {
        format!("{:.0} us", s * 1e6)
    } else if s < 1.0 {
        format!("{:.1} ms", s * 1e3)
    } else if s < 120.0 {
        format!("{s:.2} s")
    } else if s < 7200.0 {
        format!("{} m {:02} s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!("{} h {:02} m", (s / 3600.0) as u64, ((s % 3600.0) / 60.0) as u64)
    }
}

/// The human-readable report.
pub fn render(e: &Estimate) -> String {
    let mut s = String::new();
    let m = &e.model;
    s.push_str(&format!(
        "patchbay cost {}: {} ({} layers, d_model {}, d_mlp {}, vocab {}, {} parameters, {} weights)\n",
        e.command,
        m.name,
        m.n_layers,
        m.d_model,
        m.d_mlp,
        m.vocab_size,
        si(m.params as f64),
        m.weight_dtype
    ));
    s.push_str(&format!("workload: {}\n\n", e.workload));
    s.push_str(&format!("{:<22} {:>6} {:>12} {:>12} {:>12} {:>12} {:>12}\n", "", "calls", "row-layers", "FLOPs", "attn FLOPs", "bytes cpu", "bytes gpu"));
    for mc in &e.methods {
        for p in mc.phases.iter().chain(std::iter::once(&mc.total)) {
            s.push_str(&format!(
                "{:<22} {:>6} {:>12} {:>12} {:>12} {:>12} {:>12}\n",
                format!("{} {}", mc.method, p.name),
                p.calls,
                si(p.row_layers),
                si(p.flops.total),
                si(p.flops.attention),
                binary_bytes(p.bytes.cpu.total),
                binary_bytes(p.bytes.gpu.total)
            ));
        }
    }
    if let Some(r) = &e.naive_over_resumed {
        s.push_str(&format!("naive / resumed: {:.1}x FLOPs, {:.1}x bytes (cpu), {:.1}x bytes (gpu)\n", r.flops, r.bytes_cpu, r.bytes_gpu));
    }
    s.push_str("\npeak memory            weights     kv caches   activations  captures     total\n");
    for mc in &e.methods {
        for (path, mem) in [("cpu", &mc.peak_memory.cpu), ("gpu", &mc.peak_memory.gpu)] {
            s.push_str(&format!(
                "{:<22} {:>11} {:>11} {:>11} {:>11} {:>11}\n",
                format!("{} ({path})", mc.method),
                binary_bytes(mem.weights),
                binary_bytes(mem.kv_caches),
                binary_bytes(mem.activations),
                binary_bytes(mem.captures),
                binary_bytes(mem.total)
            ));
        }
    }
    s.push_str("\nestimated time");
    for mc in &e.methods {
        s.push_str(&format!("  | {:<28}", mc.method));
    }
    if e.naive_over_resumed.is_some() {
        s.push_str("  | naive/resumed");
    }
    s.push('\n');
    for (i, hw) in e.devices.iter().enumerate() {
        s.push_str(&format!("{:<14}", hw.name));
        for mc in &e.methods {
            let t = &mc.total.time[i];
            let mem = if hw.path == Path::Cpu { mc.peak_memory.cpu.total } else { mc.peak_memory.gpu.total };
            let fits = if hw.memory_bytes.is_some_and(|cap| mem > cap) { " OOM" } else { "" };
            s.push_str(&format!("  | {:<28}", format!("{} ({}){fits}", duration(t.seconds), t.dominant)));
        }
        if let Some(r) = &e.naive_over_resumed {
            s.push_str(&format!("  | {:.1}x", r.time[i].1));
        }
        s.push('\n');
    }
    s.push_str("\ndevices:\n");
    for hw in &e.devices {
        s.push_str(&format!(
            "  {}: GEMM {}, attention {}FLOP/s, weights {}B/s, memory {}B/s, {:.1} us per op{}; {}\n",
            hw.name,
            if hw.gemm_curve.is_empty() {
                format!("{}FLOP/s", si(hw.gemm_flops))
            } else {
                format!("FLOP/s by rows {}", hw.gemm_curve.iter().map(|(m, f)| format!("{m}: {}", si(*f))).collect::<Vec<_>>().join(", "))
            },
            si(hw.attention_flops),
            si(hw.weight_bandwidth),
            si(hw.bandwidth),
            hw.op_overhead_s * 1e6,
            if hw.seq_overhead_s > 0.0 { format!(" + {:.1} us per sequence and layer", hw.seq_overhead_s * 1e6) } else { String::new() },
            hw.source
        ));
    }
    s.push_str("time = per op max(FLOPs / throughput, bytes / bandwidth) on GPUs, their sum on the CPU, + a fixed cost per op; (dominant term); OOM: peak memory over the device's.\n");
    s
}

#[cfg(test)]
mod tests {
    use super::{binary_bytes, duration, si};

    #[test]
    fn number_formats() {
        let bytes: Vec<String> = [0.0, 1023.4, 1024.0, 1500.0, 1.5 * 1048576.0, 2.0 * 1073741824.0, 3.25 * 1099511627776.0].iter().map(|&v| binary_bytes(v)).collect();
        assert_eq!(bytes, ["0 B", "1023 B", "1.00 KiB", "1.46 KiB", "1.50 MiB", "2.00 GiB", "3.25 TiB"]);
        let counts: Vec<String> = [12.0, 1234.0, 1234567.0, 9.87e12].iter().map(|&v| si(v)).collect();
        assert_eq!(counts, ["12 ", "1.234 k", "1.235 M", "9.870 T"]);
        let times: Vec<String> = [850e-6, 0.0124, 1.244, 185.0, 7900.0].iter().map(|&v| duration(v)).collect();
        assert_eq!(times, ["850 us", "12.4 ms", "1.24 s", "3 m 05 s", "2 h 11 m"]);
    }
}
