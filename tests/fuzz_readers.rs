//! A seeded mutation fuzzer over the readers of untrusted files: GGUF (header walk, candle's
//! parse, tokenizer and model build, tensor reads), safetensors (open, every tensor as f32
//! and raw), PyTorch `pytorch_model.bin` (zip + pickle), SentencePiece models (parse, then segment a few strings), IDX arrays, and
//! Marian/generation config JSON. Each input is a valid seed file with 1 to 4 mutations:
//! bit flips, byte overwrites, truncation, length fields inflated to huge values, chunks
//! spliced in from elsewhere in the file, insertions and deletions.
//!
//! Every reader must return `Ok` or `Err`: never panic (caught with `catch_unwind`), and
//! never ask the allocator for more than [`MAX_ALLOC`] bytes at once (a counting global
//! allocator records the largest request). The default run is a few seconds; with
//! `QUANTLAB_FUZZ_SECS=600` it runs ten minutes and prints the executions and the distinct
//! error messages per reader. Inputs that fail are written under `target/fuzz-failures/`.

#[path = "synth/mod.rs"]
mod synth;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Largest single allocation a reader may make on a mutated small file: 256 MiB. The seeds
/// are under 10 KB, so anything near this is a size taken from the file unchecked.
const MAX_ALLOC: usize = 256 << 20;

struct Counting;
static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the wrapper only
// records the largest size requested.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` came from this allocator (hence System) with layout `l`.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        LARGEST.fetch_max(n, Ordering::Relaxed);
        // SAFETY: `p` came from this allocator (hence System) with layout `l`.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// xorshift64*: reproducible from the seed printed on failure.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Values that break length and count fields.
const INTERESTING: [u64; 10] = [
    0,
    1,
    0x7f,
    0xff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 32,
    1 << 40,
    u64::MAX,
];

fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        if b.is_empty() {
            b.push(rng.next() as u8);
        }
        let at = rng.below(b.len());
        match rng.below(8) {
            0 => b[at] ^= 1 << rng.below(8),
            1 => b[at] = rng.next() as u8,
            2 => b.truncate(at),
            // Length-field inflation: an interesting value, little- or big-endian, 4 or 8
            // bytes wide (GGUF counts are u64 LE, IDX dims u32 BE, protobuf lengths varints).
            3 | 4 => {
                let v = INTERESTING[rng.below(INTERESTING.len())];
                let bytes: Vec<u8> = match rng.below(3) {
                    0 => v.to_le_bytes().to_vec(),
                    1 => (v as u32).to_le_bytes().to_vec(),
                    _ => (v as u32).to_be_bytes().to_vec(),
                };
                let end = (at + bytes.len()).min(b.len());
                b[at..end].copy_from_slice(&bytes[..end - at]);
            }
            5 => {
                // Splice: a chunk of the file copied over another place.
                let from = rng.below(b.len());
                let n = rng.below(64).min(b.len() - from).min(b.len() - at);
                let chunk = b[from..from + n].to_vec();
                b[at..at + n].copy_from_slice(&chunk);
            }
            6 => {
                let n = 1 + rng.below(16);
                let fill: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                b.splice(at..at, fill);
            }
            _ => {
                let n = rng.below(16).min(b.len() - at);
                b.drain(at..at + n);
            }
        }
    }
    b
}

/// One reader under test: its seeds and what it does with one input.
struct Target {
    name: &'static str,
    /// Largest single allocation allowed ([`MAX_ALLOC`] but for candle's pickle parser).
    max_alloc: usize,
    seeds: Vec<Vec<u8>>,
    run: fn(&[u8], &Path) -> anyhow::Result<()>,
}

fn gguf(bytes: &[u8], dir: &Path) -> anyhow::Result<()> {
    use quantlab::arch::llama::{Llama, LoadAs};
    use quantlab::load::gguf::Gguf;
    let p = dir.join("f.gguf");
    std::fs::write(&p, bytes)?;
    let mut g = Gguf::open(&p)?;
    let _ = g.tensor_bytes();
    let names: Vec<String> = g.content.tensor_infos.keys().cloned().collect();
    for n in &names {
        if let Ok(t) = g.tensor(n, &candle_core::Device::Cpu) {
            t.dequantize(&candle_core::Device::Cpu)?;
        }
    }
    let tok = quantlab::load::tokenizer::TextTokenizer::from_gguf(&g)?;
    let ids = tok.encode("ab a b c")?;
    let _ = tok.decode(&ids);
    let m = Llama::from_gguf(&mut g, LoadAs::Ggml, &candle_core::Device::Cpu)?;
    let mut cache = m.new_cache();
    let ids =
        candle_core::Tensor::new(&[0u32, 2, 3][..], &candle_core::Device::Cpu)?.unsqueeze(0)?;
    m.forward(&ids, &mut cache, false)?;
    Ok(())
}

fn safetensors(bytes: &[u8], dir: &Path) -> anyhow::Result<()> {
    use quantlab::load::{SafetensorsSource, TensorSource};
    let p = dir.join("f.safetensors");
    std::fs::write(&p, bytes)?;
    let _ = quantlab::load::source::read_safetensors_metadata(&p);
    let _ = quantlab::load::read_input_tensor(&p, "w");
    let mut src = SafetensorsSource::open(std::slice::from_ref(&p))?;
    for n in ["w", "b", "codes", "nope"] {
        let _ = src.tensor(n, &candle_core::Device::Cpu);
        let _ = src.raw(n);
    }
    Ok(())
}

fn spm(bytes: &[u8], _dir: &Path) -> anyhow::Result<()> {
    let m = quantlab::load::spm::SentencePiece::from_bytes(bytes)?;
    for text in ["a b", "  ab  c ", "xyz ▁a", "é ß 中文", ""] {
        let _ = m.encode(text);
    }
    Ok(())
}

fn idx(bytes: &[u8], _dir: &Path) -> anyhow::Result<()> {
    quantlab::data::mnist::parse_idx(bytes, "fuzz")?;
    Ok(())
}

fn marian_config(bytes: &[u8], dir: &Path) -> anyhow::Result<()> {
    use quantlab::arch::marian::MarianConfig;
    use quantlab::eval::seq2seq::GenerateConfig;
    let v: serde_json::Value = serde_json::from_slice(bytes)?;
    let cfg = MarianConfig::from_hf_json(&v)?;
    std::fs::write(dir.join("config.json"), bytes)?;
    std::fs::write(dir.join("generation_config.json"), bytes)?;
    GenerateConfig::for_model(dir, &cfg)?;
    Ok(())
}

fn pickle(bytes: &[u8], dir: &Path) -> anyhow::Result<()> {
    use quantlab::load::{PickleSource, TensorSource};
    let p = dir.join("pytorch_model.bin");
    std::fs::write(&p, bytes)?;
    let mut src = PickleSource::open(&p)?;
    for n in ["model.shared.weight", "final_logits_bias", "lm_head.weight"] {
        let _ = src.tensor(n, &candle_core::Device::Cpu);
    }
    Ok(())
}

fn targets() -> Vec<Target> {
    let tiny = synth::tiny_llama();
    let mut q8 = tiny.clone();
    // A block-quantized tensor too (Q8_0: 34-byte blocks of 32), so GGML payloads are read.
    q8.tensors.push(synth::GgufTensor {
        name: "extra.q8_0".into(),
        dims: vec![32, 4],
        ty: 8,
        data: vec![0u8; 4 * 34],
        offset_override: None,
    });
    let f32s = synth::f32_bytes(4, 7);
    let st = synth::safetensors(&[
        ("w", "F32", vec![2, 2], f32s.clone()),
        ("b", "F16", vec![2], vec![0, 60, 0, 188]),
        ("codes", "U8", vec![3], vec![1, 2, 3]),
    ]);
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/marian-tiny");
    let mut cfg = std::fs::read(fixture.join("config.json")).unwrap();
    // The generation fields in the same object, so one mutated file exercises both.
    let gen =
        br#", "num_beams": 4, "max_length": 20, "bad_words_ids": [[39]], "early_stopping": true}"#;
    let end = cfg.iter().rposition(|&c| c == b'}').unwrap();
    cfg.truncate(end);
    cfg.extend_from_slice(gen);
    vec![
        Target {
            name: "gguf",
            max_alloc: MAX_ALLOC,
            seeds: vec![tiny.bytes(), q8.bytes()],
            run: gguf,
        },
        Target {
            name: "safetensors",
            max_alloc: MAX_ALLOC,
            seeds: vec![st],
            run: safetensors,
        },
        Target {
            name: "spm",
            max_alloc: MAX_ALLOC,
            seeds: vec![synth::spm()],
            run: spm,
        },
        Target {
            name: "idx",
            max_alloc: MAX_ALLOC,
            seeds: vec![
                synth::idx(&[3, 2, 2], &[1; 12]),
                synth::idx(&[5], &[1, 2, 3, 4, 5]),
            ],
            run: idx,
        },
        Target {
            name: "pickle",
            // Known and accepted: candle's pickle parser allocates a zeroed buffer of a
            // string's u32 length before reading it (at most 4 GiB, pages never touched
            // when the read then fails). Tensor sizes are checked by quantlab first.
            max_alloc: (4 << 30) + (1 << 20),
            seeds: vec![std::fs::read(fixture.join("pytorch_model.bin")).unwrap()],
            run: pickle,
        },
        Target {
            name: "marian-config",
            max_alloc: MAX_ALLOC,
            seeds: vec![cfg],
            run: marian_config,
        },
    ]
}

/// An error message with its numbers replaced, so messages differing only in a value count
/// once.
fn shape_of(msg: &str) -> String {
    let mut out = String::new();
    let mut in_num = false;
    for c in msg.chars().take(160) {
        if c.is_ascii_digit() {
            if !in_num {
                out.push('#');
            }
            in_num = true;
        } else {
            in_num = false;
            out.push(c);
        }
    }
    out
}

#[test]
fn readers_never_panic_or_allocate_absurdly_on_mutated_files() {
    let secs: f64 = std::env::var("QUANTLAB_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4.0);
    let long = std::env::var("QUANTLAB_FUZZ_SECS").is_ok();
    let trace = std::env::var("QUANTLAB_FUZZ_TRACE").is_ok();
    // QUANTLAB_FUZZ_ONLY=gguf,spm runs those readers only.
    let only = std::env::var("QUANTLAB_FUZZ_ONLY").ok();
    let targets: Vec<Target> = targets()
        .into_iter()
        .filter(|t| {
            only.as_deref()
                .is_none_or(|o| o.split(',').any(|n| n == t.name))
        })
        .collect();
    let per_target = Duration::from_secs_f64(secs / targets.len() as f64);
    let dir = tempfile::tempdir().unwrap();
    let failures_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-failures");
    // Panics are caught and counted; keep their messages off the test output.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut failures = Vec::new();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    // A reader that never returns is a failure too: a watchdog thread saves the input and
    // ends the run when one case takes more than HANG.
    type Current = Option<(Instant, String, Vec<u8>)>;
    static CURRENT: std::sync::Mutex<Current> = std::sync::Mutex::new(None);
    const HANG: Duration = Duration::from_secs(60);
    {
        let failures_dir = failures_dir.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_secs(1));
            let cur = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((start, name, input)) = cur.as_ref() {
                if start.elapsed() > HANG {
                    std::fs::create_dir_all(&failures_dir).unwrap();
                    let file = failures_dir.join(format!("hang-{name}"));
                    std::fs::write(&file, input).unwrap();
                    eprintln!(
                        "{name}: a case ran over {HANG:?}; input saved to {}",
                        file.display()
                    );
                    std::process::exit(3);
                }
            }
        });
    }
    for t in &targets {
        // Every seed must be accepted, or the mutations test nothing.
        for s in &t.seeds {
            if let Err(e) = (t.run)(s, dir.path()) {
                failures.push(format!("{}: a seed is refused: {e:#}", t.name));
            }
        }
        let start = Instant::now();
        let (mut execs, mut ok) = (0u64, 0u64);
        let mut errors: BTreeMap<String, u64> = BTreeMap::new();
        while start.elapsed() < per_target {
            let case_seed = rng.next();
            let mut case_rng = Rng(case_seed | 1);
            let seed = &t.seeds[case_rng.below(t.seeds.len())];
            let input = mutate(seed, &mut case_rng);
            if trace {
                // An abort (not a panic) kills the process: leave the input it died on.
                std::fs::create_dir_all(&failures_dir).unwrap();
                std::fs::write(failures_dir.join(format!("current-{}", t.name)), &input).unwrap();
            }
            *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) =
                Some((Instant::now(), t.name.to_string(), input.clone()));
            LARGEST.store(0, Ordering::Relaxed);
            let r = catch_unwind(AssertUnwindSafe(|| (t.run)(&input, dir.path())));
            let largest = LARGEST.load(Ordering::Relaxed);
            execs += 1;
            let problem = match r {
                Err(p) => Some(format!(
                    "panic: {}",
                    p.downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default()
                )),
                Ok(_) if largest > t.max_alloc => {
                    Some(format!("allocated {largest} bytes at once"))
                }
                Ok(Ok(())) => {
                    ok += 1;
                    None
                }
                Ok(Err(e)) => {
                    *errors.entry(shape_of(&format!("{e:#}"))).or_default() += 1;
                    None
                }
            };
            if let Some(p) = problem {
                std::fs::create_dir_all(&failures_dir).unwrap();
                let file = failures_dir.join(format!("{}-{case_seed:016x}", t.name));
                std::fs::write(&file, &input).unwrap();
                failures.push(format!(
                    "{} (case {case_seed:#x}, input {}): {p}",
                    t.name,
                    file.display()
                ));
                if failures.len() > 20 {
                    break;
                }
            }
        }
        println!(
            "fuzz {}: {execs} executions in {:.1}s, {ok} accepted, {} distinct error messages",
            t.name,
            start.elapsed().as_secs_f64(),
            errors.len()
        );
        if long {
            for (msg, n) in &errors {
                println!("  {n:>8}  {msg}");
            }
        }
    }
    std::panic::set_hook(default_hook);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
