//! `fleetctl`: command-line definitions, exit codes and output (human or `--json`).

pub mod build;
pub mod bundle;
pub mod client;
pub mod keys;
pub mod mlflow;
pub mod remote;
mod table;

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};

/// Exit code when a signoff requirement is not met (the bundle was not written).
pub const EXIT_SIGNOFF: i32 = 1;
/// Exit code for bad usage or configuration (EX_USAGE).
pub const EXIT_USAGE: i32 = 64;
/// Exit code for bad data: a CSV row, a model, a rejected bundle (EX_DATAERR).
pub const EXIT_DATA: i32 = 65;
/// Exit code for an input that cannot be opened (EX_NOINPUT).
pub const EXIT_NO_INPUT: i32 = 66;
/// Exit code for an output that cannot be written (EX_CANTCREAT).
pub const EXIT_CANT_CREATE: i32 = 73;

/// Everything that stops a `fleetctl` command.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("{0}")]
    Usage(String),
    #[error("{path}: {message}")]
    NoInput { path: String, message: String },
    #[error("{0}")]
    Data(String),
    #[error("bundle rejected: {0}")]
    Rejected(String),
    #[error("{path}: {message}")]
    CantCreate { path: String, message: String },
    #[error("signoff failed: {} of {} requirements not met", unmet.len(), total)]
    Signoff {
        unmet: Vec<shared::metrics::Outcome>,
        total: usize,
    },
    /// A remote command failed (see [`remote::EXIT_CODES_HELP`]).
    #[error(transparent)]
    Remote(#[from] remote::RemoteError),
}

impl CtlError {
    pub fn exit_code(&self) -> i32 {
        match self {
            CtlError::Usage(_) => EXIT_USAGE,
            CtlError::NoInput { .. } => EXIT_NO_INPUT,
            CtlError::Data(_) | CtlError::Rejected(_) => EXIT_DATA,
            CtlError::CantCreate { .. } => EXIT_CANT_CREATE,
            CtlError::Signoff { .. } => EXIT_SIGNOFF,
            CtlError::Remote(e) => e.exit_code(),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            CtlError::Usage(_) => "usage",
            CtlError::NoInput { .. } => "no_input",
            CtlError::Data(_) => "data",
            CtlError::Rejected(_) => "rejected",
            CtlError::CantCreate { .. } => "cannot_create",
            CtlError::Signoff { .. } => "signoff",
            CtlError::Remote(e) => e.kind(),
        }
    }

    /// The human message, with one line per unmet requirement for signoff failures.
    pub fn render(&self) -> String {
        match self {
            CtlError::Signoff { unmet, .. } => {
                let mut s = self.to_string();
                for o in unmet {
                    s.push_str(&format!(
                        "\n  {}: measured {}",
                        o.requirement,
                        o.measured
                            .map_or("nothing (metric not computed)".to_string(), fmt_metric)
                    ));
                }
                s
            }
            other => other.to_string(),
        }
    }

    pub fn to_json(&self) -> Value {
        if let CtlError::Remote(e) = self {
            return e.to_json();
        }
        let mut err = json!({"kind": self.kind(), "message": self.to_string()});
        if let CtlError::Signoff { unmet, total } = self {
            err["unmet"] = json!(unmet
                .iter()
                .map(|o| json!({"requirement": o.requirement, "measured": o.measured}))
                .collect::<Vec<_>>());
            err["requirements"] = json!(total);
        }
        json!({ "error": err })
    }
}

/// Formats a metric for people: 4 significant decimals.
pub fn fmt_metric(v: f64) -> String {
    format!("{v:.4}")
}

/// What a successful command reports: a line or more for people, a JSON value for scripts.
#[derive(Debug)]
pub struct Output {
    pub human: String,
    pub json: Value,
}

#[derive(Debug, Parser)]
#[command(
    name = "fleetctl",
    version,
    about = "Admin CLI for edge-ml: keys, keyrings, signed model bundles; devices, bundles, rollouts and the audit log on a fleet server",
    after_help = remote::EXIT_CODES_HELP
)]
pub struct Cli {
    /// Print machine-readable JSON on standard output (results and errors).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(flatten)]
    pub remote: remote::RemoteOpts,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate an ed25519 key pair: NAME.key (secret, mode 0600) and NAME.pub.
    Keygen {
        /// Path prefix of the two files.
        #[arg(long, value_name = "NAME")]
        out: PathBuf,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Manage the root-signed keyring of bundle-signing keys.
    #[command(subcommand)]
    Keyring(KeyringCommand),
    /// Build, verify and inspect signed model bundles; push, list, show and approve them on
    /// the fleet server.
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Check that the fleet server answers (and, with a token, that it is accepted).
    Health,
    /// Devices known to the fleet server.
    #[command(subcommand)]
    Devices(remote::DevicesCommand),
    /// Staged rollouts of a bundle to devices.
    #[command(subcommand)]
    Rollout(remote::RolloutCommand),
    /// Roll a model back to its previous version on every (or every matching) device.
    Rollback(remote::FleetRollbackArgs),
    /// The fleet server's audit log of admin actions.
    #[command(subcommand)]
    Audit(remote::AuditCommand),
}

#[derive(Debug, Subcommand)]
pub enum KeyringCommand {
    /// Start a new, empty, unsigned keyring.
    Create {
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Version number of the new keyring.
        #[arg(long, default_value_t = 1)]
        version: u64,
        #[arg(long)]
        force: bool,
    },
    /// Add a signing key (a new, unsigned version if the keyring was signed).
    Add {
        #[arg(long, value_name = "FILE")]
        keyring: PathBuf,
        /// The signing key's public file (from `fleetctl keygen`).
        #[arg(long = "pub", value_name = "FILE.pub")]
        public: PathBuf,
        /// Model names the key may sign: exact names or prefixes ending in `*`.
        #[arg(long = "model", value_name = "PATTERN", required = true)]
        models: Vec<String>,
        /// RFC 3339 time after which the key's signatures are refused.
        #[arg(long, value_name = "TIME")]
        not_after: Option<String>,
    },
    /// Revoke a signing key (a new, unsigned version if the keyring was signed).
    Revoke {
        #[arg(long, value_name = "FILE")]
        keyring: PathBuf,
        #[arg(long, value_name = "ID")]
        key_id: String,
    },
    /// Sign the keyring with the root key.
    Sign {
        #[arg(long, value_name = "FILE")]
        keyring: PathBuf,
        #[arg(long, value_name = "FILE.key")]
        root: PathBuf,
    },
    /// Show a keyring; with --root, also check its signature.
    Show {
        #[arg(long, value_name = "FILE")]
        keyring: PathBuf,
        #[arg(long, value_name = "FILE.pub")]
        root: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Build and sign a bundle, computing signoff metrics and golden samples.
    Build(Box<build::BuildArgs>),
    /// Verify a bundle as a device would (signature, keyring, every byte).
    Verify(VerifyArgs),
    /// Print a bundle's manifest as JSON (not verified).
    Inspect {
        #[arg(value_name = "FILE.bundle")]
        bundle: PathBuf,
    },
    /// Upload a bundle to the fleet server (it checks the signature and the signoff policy).
    Push {
        #[arg(value_name = "FILE.bundle")]
        file: PathBuf,
    },
    /// List the bundles stored on the fleet server.
    List,
    /// Show a stored bundle and its signoff state.
    Show {
        #[arg(value_name = "NAME@VERSION")]
        bundle: String,
    },
    /// Approve a stored bundle (role admin; not the admin who uploaded it).
    Approve {
        #[arg(value_name = "NAME@VERSION")]
        bundle: String,
    },
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The root public key the devices are provisioned with.
    #[arg(long, value_name = "FILE.pub")]
    pub root: PathBuf,
    /// The keyring the devices hold (without it, only root-signed bundles are valid).
    #[arg(long, value_name = "FILE")]
    pub keyring: Option<PathBuf>,
    /// Also load the model and re-run the golden samples, as the agent does before activation.
    #[arg(long)]
    pub golden: bool,
    #[arg(value_name = "FILE.bundle")]
    pub bundle: PathBuf,
}

/// Runs a parsed command line; returns the process exit code.
pub fn run(cli: Cli) -> i32 {
    let json = cli.json;
    let result = execute(cli);
    // Output errors (a closed pipe) are ignored: the exit code still tells the outcome.
    let mut stdout = std::io::stdout().lock();
    match result {
        Ok(out) => {
            if json {
                let _ = writeln!(stdout, "{}", pretty(&out.json));
            } else if !out.human.is_empty() {
                let _ = writeln!(stdout, "{}", out.human);
            }
            0
        }
        Err(err) => {
            if json {
                let _ = writeln!(stdout, "{}", pretty(&err.to_json()));
            }
            let _ = writeln!(std::io::stderr(), "fleetctl: {}", err.render());
            err.exit_code()
        }
    }
}

/// Runs a parsed command line; returns what it reports (printing nothing, except the
/// intermediate states of `rollout status --watch`).
pub fn execute(cli: Cli) -> Result<Output, CtlError> {
    let o = &cli.remote;
    match cli.command {
        Command::Keygen { out, force } => keys::keygen(&out, force),
        Command::Keyring(cmd) => keys::keyring(cmd),
        Command::Bundle(BundleCommand::Build(args)) => build::build(&args),
        Command::Bundle(BundleCommand::Verify(args)) => bundle::verify(&args),
        Command::Bundle(BundleCommand::Inspect { bundle }) => bundle::inspect(&bundle),
        Command::Bundle(BundleCommand::Push { file }) => Ok(remote::bundle_push(o, &file)?),
        Command::Bundle(BundleCommand::List) => Ok(remote::bundle_list(o)?),
        Command::Bundle(BundleCommand::Show { bundle }) => Ok(remote::bundle_show(o, &bundle)?),
        Command::Bundle(BundleCommand::Approve { bundle }) => {
            Ok(remote::bundle_approve(o, &bundle)?)
        }
        Command::Health => Ok(remote::health(o)?),
        Command::Devices(cmd) => Ok(remote::devices(o, cmd)?),
        Command::Rollout(cmd) => Ok(remote::rollout(o, cli.json, cmd)?),
        Command::Rollback(args) => Ok(remote::fleet_rollback(o, &args)?),
        Command::Audit(cmd) => Ok(remote::audit(o, cmd)?),
    }
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// The error for a file that cannot be read.
pub(crate) fn no_input(path: &Path, e: impl std::fmt::Display) -> CtlError {
    CtlError::NoInput {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// The error for a file that cannot be written.
pub(crate) fn cant_create(path: &Path, e: impl std::fmt::Display) -> CtlError {
    CtlError::CantCreate {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// Maps a trust error on loading a key or keyring file: unreadable files are "no input",
/// the rest is bad data.
pub(crate) fn trust_file_error(e: shared::trust::TrustError) -> CtlError {
    match e {
        shared::trust::TrustError::Io { path, source } => CtlError::NoInput {
            path,
            message: source.to_string(),
        },
        other => CtlError::Data(other.to_string()),
    }
}
