//! The engine's error type.
//!
//! Every error says which side is at fault through [`ErrorClass`]: bad input or
//! configuration (the user's), an outside system (retry may help), or a bug (ours). The class
//! is what decides between retrying, dead-lettering and stopping once failure policies exist;
//! until then every error stops the pipeline with a message naming where it happened.

use std::path::PathBuf;

use crate::config::Problems;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Who is at fault, and whether trying again can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// A record could not be decoded or does not fit the declared schema.
    Decode,
    /// A function rejected a record; trying again gives the same answer.
    Permanent,
    /// An outside system failed in a way that may pass (timeouts, refused connections).
    Transient,
    /// A bug or broken invariant in Sluice itself.
    Internal,
}

impl ErrorClass {
    pub const ALL: [ErrorClass; 4] = [
        ErrorClass::Decode,
        ErrorClass::Permanent,
        ErrorClass::Transient,
        ErrorClass::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Decode => "decode",
            ErrorClass::Permanent => "permanent",
            ErrorClass::Transient => "transient",
            ErrorClass::Internal => "internal",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pipeline file has problems; each names its YAML path and line:column.
    #[error("{0}")]
    Config(#[from] Problems),

    /// A record read from `origin` could not be turned into a row of the schema.
    #[error("bad record in {origin}: {reason}")]
    BadRecord { origin: String, reason: String },

    /// A stage failed on a batch or on some of its rows.
    #[error("stage `{stage}` failed on {origin}: {message}")]
    Stage {
        stage: String,
        origin: String,
        class: ErrorClass,
        message: String,
    },

    /// Planning a stage against its input schema failed (bad SQL, unknown column, …).
    #[error("{0}")]
    Plan(String),

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{context}: {source}")]
    Arrow {
        context: String,
        #[source]
        source: arrow::error::ArrowError,
    },

    /// A function stage's own error, classified by the function.
    #[error("{message}")]
    Function { class: ErrorClass, message: String },

    /// The checkpoint store failed: the run stops rather than go on without checkpoints.
    #[error("checkpoint store {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },

    /// An outside system (a Kafka broker, …) failed or refused.
    #[error("{system}: {message}")]
    External {
        system: &'static str,
        message: String,
    },

    /// An outside system refused Sluice's credentials or configuration (a wrong password, a
    /// user without the permission): no record can succeed until a person fixes it, so the
    /// run stops, and the batch is neither retried nor dead-lettered.
    #[error("{system}: {message}")]
    Refused {
        system: &'static str,
        message: String,
    },

    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::Config(_) | Error::BadRecord { .. } | Error::Plan(_) => ErrorClass::Decode,
            Error::Stage { class, .. } | Error::Function { class, .. } => *class,
            Error::Io { .. } | Error::Checkpoint { .. } | Error::External { .. } => {
                ErrorClass::Transient
            }
            Error::Arrow { .. } | Error::Refused { .. } => ErrorClass::Permanent,
            Error::Internal(_) => ErrorClass::Internal,
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn arrow(context: impl Into<String>, source: arrow::error::ArrowError) -> Self {
        Error::Arrow {
            context: context.into(),
            source,
        }
    }

    /// A spawned task that panicked or was cancelled, named by its role (`reader`,
    /// `worker`, `sink`, ...): one mapping for every task, as Vector's `TaskError` (the
    /// role is what a bare `From<JoinError>` could not say).
    pub fn task(role: &str, e: tokio::task::JoinError) -> Self {
        let how = if e.is_panic() {
            "panicked"
        } else {
            "was cancelled"
        };
        Error::Internal(format!("a {role} task {how}: {e}"))
    }
}

/// `Err(Error::Plan(...))` with a formatted sentence, as DataFusion's `plan_err!`: planning
/// problems keep their class and read as sentences for the user.
#[macro_export]
macro_rules! plan_err {
    ($($arg:tt)*) => {
        Err($crate::Error::Plan(format!($($arg)*)))
    };
}

/// An error and its causes as one line (`a: b: c`): clients' own messages are generic, the
/// causes say what happened (a certificate refused, a connection reset).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
