//! Batch scoring (`edge-agent predict`): streams a CSV or JSON-lines file through a model in
//! batches and writes one JSON object per input row. The output file appears only once every
//! row was scored (temporary file, fsync, rename); a bad row stops the run with its line and
//! column named. Memory is bounded by the batch size and the line-length cap.

use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use shared::engine::{Batch, BatchBuilder, EngineError, InputError, Model};

/// Longest accepted input line (bytes): protects memory from a file with no newlines.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// Input file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputFormat {
    Csv,
    Jsonl,
}

/// What `edge-agent predict` was asked to do.
#[derive(Debug, Clone)]
pub struct PredictOptions {
    pub model: PathBuf,
    /// `-` means standard input.
    pub input: PathBuf,
    /// `None` means standard output.
    pub output: Option<PathBuf>,
    pub batch: usize,
    pub format: Option<InputFormat>,
}

/// How a run ended well.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub rows: u64,
    pub seconds: f64,
}

/// Why a run failed. Nothing is left at the output path when it does.
#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    #[error("cannot open input {path}: {source}")]
    OpenInput { path: String, source: io::Error },
    #[error("model: {0}")]
    Model(#[from] EngineError),
    #[error("{path}: {source}")]
    Input { path: String, source: InputError },
    #[error("{path}: {message}")]
    Read { path: String, message: String },
    #[error("{path}: rows on lines {first_line}-{last_line}: {source}")]
    Run {
        path: String,
        first_line: u64,
        last_line: u64,
        source: EngineError,
    },
    #[error("cannot write output {path}: {source}")]
    Output { path: String, source: io::Error },
    #[error("{0}")]
    Usage(String),
}

/// Scores `opts.input` with `opts.model`.
pub fn run(opts: &PredictOptions) -> Result<Summary, PredictError> {
    let start = Instant::now();
    let model = Model::load(&opts.model)?;
    let input_name = opts.input.display().to_string();
    let stdin = opts.input == Path::new("-");
    let raw: Box<dyn Read> = if stdin {
        Box::new(io::stdin())
    } else {
        Box::new(
            File::open(&opts.input).map_err(|source| PredictError::OpenInput {
                path: input_name.clone(),
                source,
            })?,
        )
    };
    let mut reader = BufReader::with_capacity(256 * 1024, LineCap::new(raw, MAX_LINE_BYTES));
    let format = match opts.format {
        Some(f) => f,
        None => detect_format(&opts.input, &mut reader).map_err(|e| PredictError::Read {
            path: input_name.clone(),
            message: e.to_string(),
        })?,
    };
    let mut sink = Sink::open(opts.output.as_deref())?;
    let mut scorer = Scorer {
        model: &model,
        path: input_name,
        batch: opts.batch.max(1),
        rows: 0,
        first_line: 0,
        last_line: 0,
        buf: Vec::new(),
    };
    match format {
        InputFormat::Csv => scorer.csv(reader, &mut sink)?,
        InputFormat::Jsonl => scorer.jsonl(reader, &mut sink)?,
    }
    sink.commit()?;
    Ok(Summary {
        rows: scorer.rows,
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn detect_format(path: &Path, reader: &mut impl BufRead) -> io::Result<InputFormat> {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
    {
        Some(e) if e == "csv" => return Ok(InputFormat::Csv),
        Some(e) if e == "jsonl" || e == "ndjson" || e == "json" => return Ok(InputFormat::Jsonl),
        _ => {}
    }
    // No telling extension (standard input, .txt, ...): a JSON object starts with `{`.
    let buf = reader.fill_buf()?;
    let first = buf.iter().find(|b| !b.is_ascii_whitespace());
    Ok(if first == Some(&b'{') {
        InputFormat::Jsonl
    } else {
        InputFormat::Csv
    })
}

struct Scorer<'m> {
    model: &'m Model,
    path: String,
    batch: usize,
    rows: u64,
    first_line: u64,
    last_line: u64,
    buf: Vec<u8>,
}

impl<'m> Scorer<'m> {
    fn input_error(&self, source: InputError) -> PredictError {
        PredictError::Input {
            path: self.path.clone(),
            source,
        }
    }

    fn read_error(&self, message: impl Into<String>) -> PredictError {
        PredictError::Read {
            path: self.path.clone(),
            message: message.into(),
        }
    }

    fn csv(&mut self, reader: impl Read, sink: &mut Sink) -> Result<(), PredictError> {
        let mut rdr = csv::ReaderBuilder::new()
            .has_headers(true)
            .flexible(true)
            .from_reader(reader);
        let header: Vec<String> = rdr
            .headers()
            .map_err(|e| self.read_error(csv_message(&e)))?
            .iter()
            .map(String::from)
            .collect();
        if header.is_empty() || (header.len() == 1 && header[0].trim().is_empty()) {
            return Err(self.read_error("the input is empty: a CSV header row is required"));
        }
        let mut builder = self.model.batch_builder();
        builder
            .set_header(&header)
            .map_err(|e| self.input_error(e))?;
        let mut record = csv::StringRecord::new();
        loop {
            match rdr.read_record(&mut record) {
                Ok(false) => break,
                Ok(true) => {}
                Err(e) => return Err(self.read_error(csv_message(&e))),
            }
            let line = record.position().map_or(0, |p| p.line());
            let fields: Vec<&str> = record.iter().collect();
            builder
                .push_csv(&fields, line)
                .map_err(|e| self.input_error(e))?;
            self.note_line(line);
            if builder.rows() >= self.batch {
                self.flush(&mut builder, sink)?;
            }
        }
        self.flush(&mut builder, sink)
    }

    fn jsonl(&mut self, mut reader: impl BufRead, sink: &mut Sink) -> Result<(), PredictError> {
        let mut builder = self.model.batch_builder();
        let mut line = String::new();
        let mut number = 0u64;
        loop {
            line.clear();
            let n = reader
                .read_line(&mut line)
                .map_err(|e| self.read_error(format!("line {}: {e}", number + 1)))?;
            if n == 0 {
                break;
            }
            number += 1;
            let text = line.trim();
            if text.is_empty() {
                continue;
            }
            let obj: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text)
                .map_err(|e| self.read_error(format!("line {number}: not a JSON object: {e}")))?;
            builder
                .push_json(&obj, number)
                .map_err(|e| self.input_error(e))?;
            self.note_line(number);
            if builder.rows() >= self.batch {
                self.flush(&mut builder, sink)?;
            }
        }
        self.flush(&mut builder, sink)
    }

    fn note_line(&mut self, line: u64) {
        if self.first_line == 0 {
            self.first_line = line;
        }
        self.last_line = line;
    }

    fn flush(
        &mut self,
        builder: &mut BatchBuilder<'_>,
        sink: &mut Sink,
    ) -> Result<(), PredictError> {
        if builder.rows() == 0 {
            return Ok(());
        }
        let batch: Batch = builder.take();
        let out = self.model.run(&batch).map_err(|source| PredictError::Run {
            path: self.path.clone(),
            first_line: self.first_line,
            last_line: self.last_line,
            source,
        })?;
        self.buf.clear();
        for row in 0..out.rows {
            self.model.write_row_json(&out, row, &mut self.buf);
            self.buf.push(b'\n');
        }
        sink.write(&self.buf)?;
        self.rows += out.rows as u64;
        self.first_line = 0;
        Ok(())
    }
}

fn csv_message(e: &csv::Error) -> String {
    match e.position() {
        Some(p) => format!("line {}: {}", p.line(), e),
        None => e.to_string(),
    }
}

/// Where JSON lines go: standard output, or a temporary file renamed into place on commit.
enum Sink {
    Stdout(BufWriter<io::Stdout>),
    File {
        tmp: PathBuf,
        dest: PathBuf,
        out: Option<BufWriter<File>>,
    },
}

impl Sink {
    fn open(output: Option<&Path>) -> Result<Sink, PredictError> {
        let Some(dest) = output.filter(|p| *p != Path::new("-")) else {
            return Ok(Sink::Stdout(BufWriter::with_capacity(
                256 * 1024,
                io::stdout(),
            )));
        };
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "output".into());
        let tmp = dest.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
        let file = File::create(&tmp).map_err(|source| PredictError::Output {
            path: dest.display().to_string(),
            source,
        })?;
        Ok(Sink::File {
            tmp,
            dest: dest.to_path_buf(),
            out: Some(BufWriter::with_capacity(256 * 1024, file)),
        })
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), PredictError> {
        let result = match self {
            Sink::Stdout(w) => w.write_all(bytes),
            Sink::File { out: Some(w), .. } => w.write_all(bytes),
            Sink::File { out: None, .. } => Ok(()),
        };
        result.map_err(|source| self.error(source))
    }

    fn error(&self, source: io::Error) -> PredictError {
        let path = match self {
            Sink::Stdout(_) => "<stdout>".to_string(),
            Sink::File { dest, .. } => dest.display().to_string(),
        };
        PredictError::Output { path, source }
    }

    fn commit(mut self) -> Result<(), PredictError> {
        match &mut self {
            Sink::Stdout(w) => w.flush().map_err(|source| PredictError::Output {
                path: "<stdout>".into(),
                source,
            }),
            Sink::File { tmp, dest, out } => {
                let path = dest.display().to_string();
                let err = |source| PredictError::Output {
                    path: path.clone(),
                    source,
                };
                if let Some(w) = out.take() {
                    let file = w.into_inner().map_err(|e| err(e.into_error()))?;
                    file.sync_all().map_err(err)?;
                }
                std::fs::rename(&*tmp, &*dest).map_err(err)?;
                Ok(())
            }
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if let Sink::File { tmp, .. } = self {
            // after a successful commit the temporary name no longer exists
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// A reader that fails once a line grows longer than `cap` bytes, so no later buffer (CSV
/// record, JSON line) can grow without bound.
struct LineCap<R> {
    inner: R,
    cap: usize,
    current: usize,
}

impl<R: Read> LineCap<R> {
    fn new(inner: R, cap: usize) -> LineCap<R> {
        LineCap {
            inner,
            cap,
            current: 0,
        }
    }
}

impl<R: Read> Read for LineCap<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        for &b in &buf[..n] {
            if b == b'\n' {
                self.current = 0;
            } else {
                self.current += 1;
                if self.current > self.cap {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("a line is longer than {} bytes", self.cap),
                    ));
                }
            }
        }
        Ok(n)
    }
}
