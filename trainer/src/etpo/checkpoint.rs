//! Trainer checkpoints: one safetensors file holding tensors and JSON metadata, written
//! atomically (temporary file in the same folder, fsync, rename, fsync of the folder), so a
//! crash at any moment leaves either the old or the new checkpoint, never a torn one.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use candle_core::{Device, Tensor, Var};

use super::TrainError;

fn err(path: &Path, message: impl Into<String>) -> TrainError {
    TrainError::Checkpoint { path: path.to_path_buf(), message: message.into() }
}

/// Writes `tensors` and string `metadata` to `path` atomically.
pub fn write_atomic(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: HashMap<String, String>,
) -> Result<(), TrainError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| err(path, format!("cannot create the folder: {e}")))?;
    // Tensors must be contiguous in host memory for serialisation.
    let host: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<candle_core::Result<_>>()?;
    let bytes = safetensors::tensor::serialize(host.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
        .map_err(|e| err(path, format!("cannot serialise: {e}")))?;
    let name = path.file_name().ok_or_else(|| err(path, "not a file path"))?.to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let written = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(path, format!("cannot write: {e}")));
    }
    if let Ok(d) = std::fs::File::open(&dir) {
        // Make the rename durable; a failure here loses durability, not consistency.
        let _ = d.sync_all();
    }
    Ok(())
}

/// A checkpoint's named tensors and string metadata.
pub type Contents = (HashMap<String, Tensor>, HashMap<String, String>);

/// Reads a checkpoint written by [`write_atomic`]: its tensors (on `device`) and metadata.
pub fn read(path: &Path, device: &Device) -> Result<Contents, TrainError> {
    let bytes = std::fs::read(path).map_err(|e| err(path, format!("cannot read: {e}")))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| err(path, format!("not a safetensors checkpoint: {e}")))?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)?;
    Ok((tensors, metadata))
}

/// A required metadata entry.
pub fn meta<'a>(path: &Path, metadata: &'a HashMap<String, String>, key: &str) -> Result<&'a str, TrainError> {
    metadata.get(key).map(String::as_str).ok_or_else(|| err(path, format!("metadata `{key}` is missing")))
}

/// Refuses a checkpoint whose `format` entry is not `expected` (one written by another trainer);
/// `what` names the expected kind in the message, e.g. "an ETPO trainer checkpoint".
pub fn check_format(
    path: &Path,
    metadata: &HashMap<String, String>,
    expected: &str,
    what: &str,
) -> Result<(), TrainError> {
    let format = meta(path, metadata, "format")?;
    if format != expected {
        return Err(err(path, format!("format `{format}`, expected `{expected}` ({what})")));
    }
    Ok(())
}

/// A required metadata entry parsed as JSON.
pub fn meta_json<T: serde::de::DeserializeOwned>(
    path: &Path,
    metadata: &HashMap<String, String>,
    key: &str,
) -> Result<T, TrainError> {
    serde_json::from_str(meta(path, metadata, key)?).map_err(|e| err(path, format!("metadata `{key}`: {e}")))
}

/// Named tensors of a list of variables: `<prefix>.<index>`.
pub fn var_tensors(prefix: &str, vars: &[Var]) -> Vec<(String, Tensor)> {
    vars.iter().enumerate().map(|(i, v)| (format!("{prefix}.{i}"), v.as_detached_tensor())).collect()
}

/// Sets `vars` from the tensors saved by [`var_tensors`], checking count and shapes.
pub fn restore_vars(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    prefix: &str,
    vars: &[Var],
) -> Result<(), TrainError> {
    let saved = tensors
        .keys()
        .filter(|k| k.strip_prefix(prefix).is_some_and(|r| r.starts_with('.') && r[1..].parse::<usize>().is_ok()))
        .count();
    if saved != vars.len() {
        return Err(err(
            path,
            format!("`{prefix}` has {saved} tensors, the model expects {} (different LoRA configuration?)", vars.len()),
        ));
    }
    for (i, v) in vars.iter().enumerate() {
        let key = format!("{prefix}.{i}");
        let t = tensors.get(&key).ok_or_else(|| err(path, format!("tensor `{key}` is missing")))?;
        if t.shape() != v.shape() {
            return Err(err(path, format!("tensor `{key}` has shape {:?}, expected {:?}", t.shape(), v.shape())));
        }
        v.set(&t.to_dtype(v.dtype())?.to_device(v.device())?)?;
    }
    Ok(())
}

/// Optimiser moments as named tensors under `prefix`.
pub fn optim_tensors(prefix: &str, opt: &super::AdamW) -> Vec<(String, Tensor)> {
    opt.state_tensors().into_iter().map(|(k, t)| (format!("{prefix}.{k}"), t)).collect()
}

/// Restores optimiser moments saved by [`optim_tensors`].
pub fn restore_optim(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    prefix: &str,
    opt: &mut super::AdamW,
    steps: u64,
) -> Result<(), TrainError> {
    let own: HashMap<String, Tensor> = tensors
        .iter()
        .filter_map(|(k, t)| {
            k.strip_prefix(prefix).and_then(|r| r.strip_prefix('.')).map(|r| (r.to_string(), t.clone()))
        })
        .collect();
    opt.load_state(&own, steps).map_err(|m| err(path, m))
}
