//! The crate's one error type.
//!
//! Every failure a user can cause (a bad file, a bad option, a missing calibration tensor) is a
//! variant that names the culprit — file, tensor, shape or value — so the CLI can print it as is
//! and exit with code 2. Device failures (no adapter, a shader that does not compile, a lost
//! device) are variants too: they are reported, never panicked on.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in comq-gpu.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model whose layout is not one of the ViT families the forward pass knows.
    #[error("{path}: {reason}")]
    UnknownModel {
        /// The model file or directory.
        path: PathBuf,
        /// What was missing or unexpected, with what to do instead.
        reason: String,
    },

    /// An image or image set that cannot be used.
    #[error("{path}: {reason}")]
    Image {
        /// The image file, image pack or folder.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// An operating-system I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file being read or written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A safetensors file that cannot be parsed (truncated, a header that lies, bad JSON…).
    #[error("{path}: not a valid safetensors file: {reason}")]
    BadSafetensors {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A tensor whose dtype, shape or contents the operation cannot use.
    #[error("tensor '{tensor}' in {path}: {reason}")]
    BadTensor {
        /// The file holding the tensor.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A layer has no calibration data and `--data-free` was not given.
    #[error(
        "no calibration for layer '{layer}': pass --images DIR|PACK (images the model's own forward \
         pass turns into each layer's inputs, for a recognised ViT), --calib FILE.safetensors holding \
         '{prefix}.input' (activations [N, {cols}]) or '{prefix}.gram' ([{cols}, {cols}]), or \
         --data-free to use G = I"
    )]
    MissingCalibration {
        /// The weight tensor's name.
        layer: String,
        /// The weight name without `.weight`.
        prefix: String,
        /// The layer's input width.
        cols: usize,
    },

    /// An option value that is out of range or inconsistent with the model.
    #[error("invalid option: {0}")]
    InvalidOption(String),

    /// A thread of the run's pipeline (the weight reader, the output writer) stopped before its
    /// work was done; the error that stopped it, if any, is reported in its place.
    #[error("internal error: the {0} stopped early")]
    WorkerStopped(&'static str),

    /// A thread of the run's pipeline panicked (a bug: please report it with the log).
    #[error("internal error: the {0} panicked; please report this with the log (RUST_LOG=debug)")]
    WorkerPanicked(&'static str),

    /// A broken invariant of comq-gpu itself, never the user's input (a bug: please report it).
    #[error("internal error: {0}; please report this")]
    Internal(String),

    /// A benchmark's child run failed or wrote a report that cannot be read.
    #[error("benchmark: {0}")]
    Bench(String),

    /// A shape that the operation cannot handle (dimension mismatch, empty tensor…).
    #[error("shape error: {0}")]
    Shape(String),

    /// A non-finite number where only finite ones make sense.
    #[error("non-finite value in {what}: {value} at index {index}")]
    NonFinite {
        /// Which tensor or quantity.
        what: String,
        /// The offending value.
        value: f64,
        /// Its flat index.
        index: usize,
    },

    /// No GPU adapter, or none matching the request.
    #[error("no GPU adapter: {0}")]
    NoAdapter(String),

    /// A WGSL shader failed to compile or validate.
    #[error("shader '{kernel}' failed to build: {message}")]
    Shader {
        /// The kernel's name.
        kernel: String,
        /// The validation message.
        message: String,
    },

    /// A GPU operation failed (allocation, lost device, mapping).
    #[error("GPU error{}: {message}", layer.as_ref().map(|l| format!(" in layer '{l}'")).unwrap_or_default())]
    Gpu {
        /// The layer being processed, when known.
        layer: Option<String>,
        /// What failed, with a suggested fix when there is one.
        message: String,
    },
}

impl Error {
    /// Shorthand for an [`Error::Io`] on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// Shorthand for an [`Error::BadTensor`].
    pub fn tensor(path: impl Into<PathBuf>, tensor: &str, reason: impl Into<String>) -> Self {
        Error::BadTensor {
            path: path.into(),
            tensor: tensor.to_string(),
            reason: reason.into(),
        }
    }

    /// Attaches a layer name to a GPU error that has none yet.
    pub fn in_layer(self, name: &str) -> Self {
        match self {
            Error::Gpu {
                layer: None,
                message,
            } => Error::Gpu {
                layer: Some(name.to_string()),
                message,
            },
            other => other,
        }
    }
}
