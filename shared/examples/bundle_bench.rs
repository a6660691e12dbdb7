//! Bundle verification benchmark: makes a bundle of a model with a fixed throwaway key,
//! times `shared::bundle::verify` on it, makes signed zstd bombs and verifies one bundle once
//! (for `/usr/bin/time -v`). `shared/benches/bundle.sh` runs it next to
//! `zstd -dc FILE | sha256sum` and prints the ratio.
//!
//! Usage (`cargo run --release -p shared --example bundle_bench -- ...`):
//! - `make --model FILE.onnx --out FILE.bundle`: a bundle holding the model as `model.onnx`;
//! - `verify FILE.bundle [--reps N]`: median and min wall time of `verify`, without staging and
//!   staging into a temporary directory beside the bundle;
//! - `verify-once FILE.bundle [--staging DIR] [--expect-reject]`: one verification; exits 0
//!   when it verifies (or, with `--expect-reject`, when it is rejected);
//! - `bomb --out FILE [--kind zeros|oversize|window] [--gib N]`: a bundle signed with the
//!   benchmark key that a zstd bomb would look like: `zeros`, a valid archive followed by
//!   N GiB (default 4) of zeros inside the payload frame; `oversize`, an entry whose header
//!   claims N GiB where the manifest lists a few hundred bytes; `window`, a payload frame
//!   declaring a 128 MiB window (the verifier allows 8 MiB) over 512 MiB of zeros;
//! - `phases FILE.bundle [--reps N]`: where the time goes (read, decompress, hash), and a
//!   prototype of verification with hashing on a second thread.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};
use shared::bundle::{assemble, testing, verify, write_bundle, BundleFile, Limits};
use shared::trust::{hex, SecretKey, Trust};
use time::OffsetDateTime;

/// The throwaway key every benchmark bundle is signed with.
fn key() -> SecretKey {
    SecretKey::from_seed([0x42; 32])
}

fn trust() -> Trust {
    Trust::root_only(key().public())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        bail!("usage: bundle_bench make|verify|verify-once|bomb|phases ... (see the source)");
    };
    let opts = Opts::parse(rest)?;
    match cmd.as_str() {
        "make" => make(&opts),
        "verify" => verify_reps(&opts),
        "verify-once" => verify_once(&opts),
        "bomb" => bomb(&opts),
        "phases" => phases(&opts),
        other => bail!("unknown subcommand {other:?}"),
    }
}

#[derive(Default)]
struct Opts {
    file: Option<PathBuf>,
    model: Option<PathBuf>,
    out: Option<PathBuf>,
    staging: Option<PathBuf>,
    kind: Option<String>,
    reps: Option<usize>,
    gib: Option<u64>,
    expect_reject: bool,
}

impl Opts {
    fn parse(args: &[String]) -> anyhow::Result<Opts> {
        let mut o = Opts::default();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = || it.next().with_context(|| format!("{a} needs a value"));
            match a.as_str() {
                "--model" => o.model = Some(value()?.into()),
                "--out" => o.out = Some(value()?.into()),
                "--staging" => o.staging = Some(value()?.into()),
                "--kind" => o.kind = Some(value()?.clone()),
                "--reps" => o.reps = Some(value()?.parse()?),
                "--gib" => o.gib = Some(value()?.parse()?),
                "--expect-reject" => o.expect_reject = true,
                flag if flag.starts_with("--") => bail!("unknown flag {flag}"),
                file => o.file = Some(file.into()),
            }
        }
        Ok(o)
    }

    fn file(&self) -> anyhow::Result<&Path> {
        self.file.as_deref().context("missing the bundle file")
    }

    fn out(&self) -> anyhow::Result<&Path> {
        self.out.as_deref().context("missing --out FILE")
    }
}

fn make(o: &Opts) -> anyhow::Result<()> {
    let model = o.model.as_deref().context("missing --model FILE")?;
    let out = o.out()?;
    let mut m = testing::manifest("bench-forest", &[]);
    let files = [BundleFile {
        path: "model.onnx".into(),
        source: model.to_path_buf(),
    }];
    let t = Instant::now();
    let size = write_bundle(&mut m, &files, &key(), out)?;
    println!(
        "{}: {size} bytes (model {} bytes, payload frame {} bytes), written in {:.2} s",
        out.display(),
        m.files[0].size,
        m.payload.size,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

/// Times `f` `reps` times after one warm-up; returns (median, min) in milliseconds.
fn time_ms(reps: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<(f64, f64)> {
    f()?;
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok((median(v.clone()), min(&v)))
}

fn verify_reps(o: &Opts) -> anyhow::Result<()> {
    let file = o.file()?;
    let reps = o.reps.unwrap_or(10);
    let (trust, limits) = (trust(), Limits::default());
    let size = std::fs::metadata(file)?.len();
    let (med, lo) = time_ms(reps, || {
        verify(file, &trust, &limits, None, OffsetDateTime::now_utc())?;
        Ok(())
    })?;
    println!("verify, no staging:      median {med:8.1} ms, min {lo:8.1} ms ({size} bytes)");
    let parent = tempfile::Builder::new()
        .prefix(".bundle-bench-")
        .tempdir_in(file.parent().unwrap_or(Path::new(".")))?;
    let (med, lo) = time_ms(reps, || {
        let v = verify(
            file,
            &trust,
            &limits,
            Some(parent.path()),
            OffsetDateTime::now_utc(),
        )?;
        drop(v.staging); // removes the staged files
        Ok(())
    })?;
    println!("verify, staging to disk: median {med:8.1} ms, min {lo:8.1} ms");
    Ok(())
}

fn verify_once(o: &Opts) -> anyhow::Result<()> {
    let file = o.file()?;
    let t = Instant::now();
    let res = verify(
        file,
        &trust(),
        &Limits::default(),
        o.staging.as_deref(),
        OffsetDateTime::now_utc(),
    );
    let ms = t.elapsed().as_secs_f64() * 1e3;
    match (res, o.expect_reject) {
        (Ok(v), false) => {
            eprintln!(
                "verified in {ms:.1} ms: {} compressed bytes, {} archive bytes",
                v.compressed_bytes, v.archive_bytes
            );
            Ok(())
        }
        (Err(e), true) => {
            eprintln!("rejected as expected in {ms:.1} ms: {e}");
            Ok(())
        }
        (Ok(_), true) => bail!("verified a bundle that should have been rejected"),
        (Err(e), false) => Err(e.into()),
    }
}

/// One ustar entry (header, data, padding), with `claim` as the header's size.
fn tar_entry(out: &mut Vec<u8>, name: &str, data: &[u8], claim: u64) -> anyhow::Result<()> {
    let mut h = tar::Header::new_ustar();
    h.set_path(name)?;
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(claim);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    Ok(())
}

fn bomb(o: &Opts) -> anyhow::Result<()> {
    let out = o.out()?;
    let kind = o.kind.as_deref().unwrap_or("zeros");
    let gib = o.gib.unwrap_or(4);
    let model = shared::engine::testing::scaler_model(3, None);
    let mut m = testing::manifest("bench-forest", &[("model.onnx", &model)]);
    let mut archive = Vec::new();
    let claim = match kind {
        "oversize" => gib << 30,
        "zeros" | "window" => model.len() as u64,
        other => bail!("unknown bomb kind {other:?} (zeros, oversize, window)"),
    };
    tar_entry(&mut archive, "model.onnx", &model, claim)?;
    archive.extend_from_slice(&[0u8; 1024]);
    let zeros: u64 = match kind {
        "zeros" => gib << 30,
        "window" => 512 << 20,
        _ => 0,
    };
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3)?;
    if kind == "window" {
        enc.window_log(27)?;
    }
    enc.write_all(&archive)?;
    let chunk = vec![0u8; 1 << 20];
    for _ in 0..zeros >> 20 {
        enc.write_all(&chunk)?;
    }
    let payload = enc.finish()?;
    let bytes = assemble(&mut m, &payload, &key())?;
    std::fs::write(out, &bytes)?;
    println!(
        "{}: {kind} bomb, {} bytes, its payload decompresses to {} bytes",
        out.display(),
        bytes.len(),
        archive.len() as u64 + zeros
    );
    Ok(())
}

/// Reads `r` to the end in `chunk`-sized reads, feeding every chunk to `f`.
fn drain(mut r: impl Read, chunk: usize, mut f: impl FnMut(&[u8])) -> anyhow::Result<u64> {
    let mut buf = vec![0u8; chunk];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        f(&buf[..n]);
        total += n as u64;
    }
}

/// A decoder of every frame of the file (what `zstd -dc` does).
fn decoder(file: &Path) -> anyhow::Result<zstd::stream::read::Decoder<'static, impl BufRead>> {
    let r = BufReader::with_capacity(256 * 1024, File::open(file)?);
    Ok(zstd::stream::read::Decoder::with_buffer(r)?)
}

/// Passes what is read through to `tx` in chunks, for hashing on another thread.
struct Tee<R: Read> {
    inner: R,
    tx: mpsc::SyncSender<Vec<u8>>,
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.tx
                .send(buf[..n].to_vec())
                .map_err(|_| std::io::Error::other("hasher thread gone"))?;
        }
        Ok(n)
    }
}

fn hasher_thread(rx: mpsc::Receiver<Vec<u8>>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut h = Sha256::new();
        for chunk in rx {
            h.update(&chunk);
        }
        hex(&h.finalize())
    })
}

fn phases(o: &Opts) -> anyhow::Result<()> {
    let file = o.file()?;
    let reps = o.reps.unwrap_or(10);
    let chunk = 256 * 1024;
    let compressed = std::fs::read(file)?;
    let decompressed = zstd::stream::decode_all(&compressed[..])?;
    println!(
        "{}: {} bytes compressed, {} bytes decompressed (all frames)",
        file.display(),
        compressed.len(),
        decompressed.len()
    );
    let report = |what: &str, (med, lo): (f64, f64), bytes: usize| {
        println!(
            "{what:<58} median {med:7.1} ms, min {lo:7.1} ms ({:6.0} MB/s)",
            bytes as f64 / 1e6 / (lo / 1e3)
        );
    };
    let sink = |b: &[u8]| {
        std::hint::black_box(b);
    };
    report(
        "read the file (page cache), 256 KiB reads",
        time_ms(reps, || drain(File::open(file)?, chunk, sink).map(drop))?,
        compressed.len(),
    );
    report(
        "sha256 of the compressed bytes (in memory)",
        time_ms(reps, || {
            std::hint::black_box(Sha256::digest(&compressed));
            Ok(())
        })?,
        compressed.len(),
    );
    report(
        "sha256 of the decompressed bytes (in memory)",
        time_ms(reps, || {
            std::hint::black_box(Sha256::digest(&decompressed));
            Ok(())
        })?,
        decompressed.len(),
    );
    for c in [64 * 1024, 256 * 1024, 1024 * 1024] {
        report(
            &format!("decompress the file, {} KiB reads", c / 1024),
            time_ms(reps, || drain(decoder(file)?, c, sink).map(drop))?,
            decompressed.len(),
        );
    }
    report(
        "decompress + sha256 both sides, one thread (~ verify)",
        time_ms(reps, || {
            let mut hc = Sha256::new();
            let hashing = Tap {
                inner: BufReader::with_capacity(chunk, File::open(file)?),
                hasher: &mut hc,
            };
            let dec =
                zstd::stream::read::Decoder::with_buffer(BufReader::with_capacity(chunk, hashing))?;
            let mut hd = Sha256::new();
            drain(dec, chunk, |b| hd.update(b))?;
            std::hint::black_box((hd.finalize(), hc.finalize()));
            Ok(())
        })?,
        decompressed.len(),
    );
    report(
        "decompress, sha256 of the output on a second thread",
        time_ms(reps, || {
            let (tx, rx) = mpsc::sync_channel(4);
            let h = hasher_thread(rx);
            drain(decoder(file)?, chunk, |b| {
                let _ = tx.send(b.to_vec());
            })?;
            drop(tx);
            std::hint::black_box(h.join().map_err(|_| anyhow::anyhow!("hasher panicked"))?);
            Ok(())
        })?,
        decompressed.len(),
    );
    report(
        "decompress, sha256 of both sides on a second thread",
        time_ms(reps, || {
            let (tx, rx) = mpsc::sync_channel(4);
            let hd = hasher_thread(rx);
            let (ctx, crx) = mpsc::sync_channel(4);
            let hc = hasher_thread(crx);
            let tee = Tee {
                inner: File::open(file)?,
                tx: ctx,
            };
            let dec =
                zstd::stream::read::Decoder::with_buffer(BufReader::with_capacity(chunk, tee))?;
            drain(dec, chunk, |b| {
                let _ = tx.send(b.to_vec());
            })?;
            drop(tx);
            let joined = (hd.join(), hc.join());
            let (Ok(d), Ok(c)) = joined else {
                bail!("hasher panicked");
            };
            std::hint::black_box((d, c));
            Ok(())
        })?,
        decompressed.len(),
    );
    let (trust, limits) = (trust(), Limits::default());
    report(
        "shared::bundle::verify, no staging",
        time_ms(reps, || {
            verify(file, &trust, &limits, None, OffsetDateTime::now_utc())?;
            Ok(())
        })?,
        decompressed.len(),
    );
    Ok(())
}

/// Hashes what passes through (the compressed side, as `PayloadReader` does).
struct Tap<'a, R: Read> {
    inner: R,
    hasher: &'a mut Sha256,
}

impl<R: Read> Read for Tap<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}
