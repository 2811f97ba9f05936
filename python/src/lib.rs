//! `etpo._etpo`: the native half of the `etpo` Python package. It exposes the runtime's
//! environments ([`runtime::env::Task`] and [`runtime::env::Env`]) as they are, with plain Python
//! values; the Gymnasium `Env` class, the spaces and the registration are Python (`etpo/`).
//!
//! One [`Host`] per process runs every environment: its sandbox worker pool starts when the first
//! task is loaded and is shared by all environments, as in `etpo run`. Loading, `reset` and `step`
//! release the GIL, so Python threads (or vector environments) step environments in parallel, up to
//! the pool's number of workers.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use envspec::{ChatMessage, ChatTemplate, Prompt, Spec};
use pyo3::create_exception;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use runtime::env::{Host, Observation};
use runtime::PoolConfig;

create_exception!(
    etpo,
    SpecError,
    PyValueError,
    "A spec file is invalid. `str(e)` is the CLI's report (`file:line:col: error: ...`, one line \
     per problem); `e.file` is the file and `e.diagnostics` a list of (line, column, message, help) \
     tuples, line and column being None for problems with the file as a whole."
);
create_exception!(
    etpo,
    EnvError,
    PyRuntimeError,
    "The environment itself failed: its data could not be loaded, a template could not be \
     rendered, or the sandbox broke down. A failing action is never an error: it gets the spec's \
     failure reward."
);

/// The process's host and the configuration it was (or will be) made with.
struct HostSlot {
    python: PathBuf,
    workers: usize,
    /// Made on the first load.
    host: Option<Arc<Host>>,
    /// A task was loaded on `host`: from then on the configuration is fixed. (A first load that
    /// failed, e.g. on an interpreter that does not start, leaves it open to correction.)
    used: bool,
    /// The process that made `host`. A child forked from it (multiprocessing, Gymnasium's
    /// `AsyncVectorEnv`) must not use the parent's workers: it gets a pool of its own.
    owner: u32,
}

fn host_slot() -> MutexGuard<'static, HostSlot> {
    static SLOT: OnceLock<Mutex<HostSlot>> = OnceLock::new();
    let slot = SLOT.get_or_init(|| {
        let defaults = PoolConfig::default();
        Mutex::new(HostSlot {
            python: defaults.python,
            workers: defaults.workers,
            host: None,
            used: false,
            owner: std::process::id(),
        })
    });
    // A panic while the lock was held cannot leave the slot half-written: recover it.
    let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
    if slot.owner != std::process::id() {
        // Forked: the inherited pool's workers belong to the parent. Dropping it here would stop
        // them, so it is leaked; this process starts its own on first use.
        std::mem::forget(slot.host.take());
        slot.used = false;
        slot.owner = std::process::id();
    }
    slot
}

/// The host of this process, made now with the configured pool if this is its first use.
fn host() -> Arc<Host> {
    let mut slot = host_slot();
    if let Some(host) = &slot.host {
        return host.clone();
    }
    let host = Arc::new(Host::new(PoolConfig {
        workers: slot.workers,
        python: slot.python.clone(),
        limits: runtime::Limits::default(),
    }));
    slot.host = Some(host.clone());
    host
}

/// Sets the sandbox pool's Python interpreter (it needs numpy and scikit-learn) and its number of
/// workers, i.e. of actions evaluated at the same time. Only before the first environment is
/// made; later, only the settings already in force are accepted.
///
/// Defaults: `$ETPO_PYTHON`, else the etpo repository's `.venv/bin/python`, else `python3`; one
/// worker per core.
#[pyfunction]
#[pyo3(signature = (python=None, workers=None))]
fn configure(python: Option<PathBuf>, workers: Option<usize>) -> PyResult<()> {
    let mut slot = host_slot();
    if workers == Some(0) {
        return Err(PyValueError::new_err("workers must be at least 1"));
    }
    let python_changes = python.as_ref().is_some_and(|p| *p != slot.python);
    let workers_change = workers.is_some_and(|w| w != slot.workers);
    if slot.used && (python_changes || workers_change) {
        return Err(PyRuntimeError::new_err(format!(
            "the sandbox pool already runs {} with {} workers; configure() must be called before \
             the first environment is made",
            slot.python.display(),
            slot.workers
        )));
    }
    if python_changes || workers_change {
        // Made with the old settings but never used: the next load makes one with the new.
        slot.host = None;
    }
    if let Some(p) = python {
        slot.python = p;
    }
    if let Some(w) = workers {
        slot.workers = w;
    }
    Ok(())
}

/// The current settings of the sandbox pool: (python, workers, fixed), `fixed` once an
/// environment was made with them.
#[pyfunction]
fn sandbox() -> (std::ffi::OsString, usize, bool) {
    let slot = host_slot();
    (slot.python.clone().into_os_string(), slot.workers, slot.used)
}

/// The spec files in `paths` (files as they are, folders' `*.yaml`/`*.yml` files), sorted.
#[pyfunction]
fn find_specs(py: Python<'_>, paths: Vec<PathBuf>) -> PyResult<Vec<std::ffi::OsString>> {
    let files = envspec::find_specs(&paths).map_err(|e| spec_error(py, &e))?;
    Ok(files.into_iter().map(PathBuf::into_os_string).collect())
}

/// Loads and validates a spec; returns its description (see `spec_info`). Raises `SpecError`.
#[pyfunction]
fn check(py: Python<'_>, path: PathBuf) -> PyResult<Py<PyDict>> {
    let spec = py.detach(|| envspec::load(&path)).map_err(|e| spec_error(py, &e))?;
    spec_info(py, &spec)
}

/// A spec made ready to run: its data loaded, on the process's sandbox pool.
#[pyclass(frozen, module = "etpo._etpo")]
struct Task {
    task: Arc<runtime::env::Task>,
}

#[pymethods]
impl Task {
    /// Loads the spec at `path` and what it needs (its data set), starting the sandbox pool if
    /// this is the process's first task. Raises `SpecError` or `EnvError`.
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Task> {
        let spec = py.detach(|| envspec::load(&path)).map_err(|e| spec_error(py, &e))?;
        let host = host();
        let loaded = py.detach(|| runtime::env::Task::load(Arc::new(spec), &host));
        let mut slot = host_slot();
        match loaded {
            Ok(task) => {
                slot.used = true;
                Ok(Task { task: Arc::new(task) })
            }
            Err(e) => {
                if !slot.used && slot.host.as_ref().is_some_and(|h| Arc::ptr_eq(h, &host)) {
                    slot.host = None;
                }
                Err(EnvError::new_err(e.to_string()))
            }
        }
    }

    /// The spec's description: a dict (see `spec_info`).
    #[getter]
    fn info(&self, py: Python<'_>) -> PyResult<Py<PyDict>> {
        spec_info(py, self.task.spec())
    }

    /// The environment for one seed (for data tasks, the seed picks the train/validation split).
    /// `chat_template` (Jinja source, as in a tokenizer's config) renders chat observations as
    /// text; without it they are rendered in ChatML.
    #[pyo3(signature = (seed, chat_template=None, bos_token="", eos_token=""))]
    fn env(
        &self,
        py: Python<'_>,
        seed: u64,
        chat_template: Option<&str>,
        bos_token: &str,
        eos_token: &str,
    ) -> PyResult<Env> {
        let template = ChatTemplate::new(chat_template.unwrap_or(CHATML), bos_token, eos_token)
            .map_err(|e| PyValueError::new_err(format!("the chat template does not compile: {e}")))?;
        let env = py.detach(|| self.task.env(seed)).map_err(|e| EnvError::new_err(e.to_string()))?;
        Ok(Env { env: Mutex::new(env), chat_template: template, seed })
    }
}

/// ChatML, the chat format of the default model (SmolLM2) and many others: used to show chat
/// observations as text when no template is given.
const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// One environment: [`runtime::env::Env`] with plain Python results.
#[pyclass(frozen, module = "etpo._etpo")]
struct Env {
    /// Locked for a whole reset or step: an environment is one episode at a time.
    env: Mutex<runtime::env::Env>,
    chat_template: ChatTemplate,
    seed: u64,
}

impl Env {
    fn lock(&self) -> MutexGuard<'_, runtime::env::Env> {
        self.env.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The observation's entries: `observation` (text), `messages` (list of {role, content} for
    /// chat prompts, else None) and `step`.
    fn observation(&self, py: Python<'_>, obs: &Observation, out: &Bound<'_, PyDict>) -> PyResult<()> {
        let (text, messages) = match &obs.prompt {
            Prompt::Completion(text) => (text.clone(), None),
            Prompt::Chat(messages) => {
                let text = self
                    .chat_template
                    .render(messages, true)
                    .map_err(|e| EnvError::new_err(format!("the chat template failed: {e}")))?;
                (text, Some(messages_list(py, messages)?))
            }
        };
        out.set_item("observation", text)?;
        out.set_item("messages", messages)?;
        out.set_item("step", obs.step)?;
        Ok(())
    }
}

#[pymethods]
impl Env {
    /// The seed this environment was made with.
    #[getter]
    fn seed(&self) -> u64 {
        self.seed
    }

    /// Starts an episode. Returns a dict: observation, messages, step.
    fn reset(&self, py: Python<'_>) -> PyResult<Py<PyDict>> {
        let obs = py.detach(|| self.lock().reset()).map_err(|e| EnvError::new_err(e.to_string()))?;
        let out = PyDict::new(py);
        self.observation(py, &obs, &out)?;
        Ok(out.unbind())
    }

    /// Takes one step with the policy's raw generation (the spec's extraction cuts the action out
    /// of it). Returns a dict: observation, messages, step, reward, terminated, truncated, action,
    /// error, ran, wall_s, cpu_s, peak_rss_mb.
    fn step(&self, py: Python<'_>, generation: &str) -> PyResult<Py<PyDict>> {
        let result = py.detach(|| self.lock().step(generation)).map_err(|e| EnvError::new_err(e.to_string()))?;
        let out = PyDict::new(py);
        self.observation(py, &result.observation, &out)?;
        out.set_item("reward", result.reward)?;
        out.set_item("terminated", result.terminated)?;
        out.set_item("truncated", result.truncated)?;
        let info = &result.info;
        out.set_item("action", &info.action)?;
        out.set_item("error", &info.error)?;
        out.set_item("ran", info.ran)?;
        out.set_item("wall_s", info.wall_s)?;
        out.set_item("cpu_s", info.cpu_s)?;
        out.set_item("peak_rss_mb", info.peak_rss_mb)?;
        Ok(out.unbind())
    }

    /// The held-out score of an action (as a step's `action` gave it: already extracted) on the
    /// test part of this seed's split (`dataset.test_fraction`), which no reward uses: the
    /// program is assembled as a step assembles it and scored once, the sandbox getting the test
    /// features and never a label. Returns a dict: test_score (None when the program failed),
    /// error, ran, wall_s, cpu_s, peak_rss_mb. A ValueError for a game or a spec without a test
    /// part.
    fn score_test(&self, py: Python<'_>, action: &str) -> PyResult<Py<PyDict>> {
        let score = py.detach(|| {
            let env = self.lock();
            match env.score_action_on_test(action) {
                Ok(Some(score)) => Ok(score),
                Ok(None) => Err(PyValueError::new_err(format!(
                    "spec {:?} holds out no test part (it is a game, or its dataset.test_fraction is 0)",
                    env.spec().name
                ))),
                Err(e) => Err(EnvError::new_err(e.to_string())),
            }
        })?;
        let out = PyDict::new(py);
        let (test_score, error) = match &score.result {
            Ok(auc) => (Some(*auc), String::new()),
            Err(e) => (None, e.clone()),
        };
        out.set_item("test_score", test_score)?;
        out.set_item("error", error)?;
        out.set_item("ran", test_score.is_some())?;
        out.set_item("wall_s", score.wall_s)?;
        out.set_item("cpu_s", score.cpu_s)?;
        out.set_item("peak_rss_mb", score.peak_rss_mb)?;
        Ok(out.unbind())
    }
}

fn messages_list<'py>(py: Python<'py>, messages: &[ChatMessage]) -> PyResult<Bound<'py, PyList>> {
    let list = PyList::empty(py);
    for m in messages {
        let d = PyDict::new(py);
        d.set_item("role", &m.role)?;
        d.set_item("content", &m.content)?;
        list.append(d)?;
    }
    Ok(list)
}

/// What Python needs to know about a spec: name, description, path, kind, format (completion or
/// chat), max_steps, failure_reward, seeds, extract, max_new_tokens, stop.
fn spec_info(py: Python<'_>, spec: &Spec) -> PyResult<Py<PyDict>> {
    let d = PyDict::new(py);
    d.set_item("name", &spec.name)?;
    d.set_item("description", &spec.description)?;
    d.set_item("path", spec.path.clone().into_os_string())?;
    d.set_item("kind", snake_case(&spec.kind)?)?;
    d.set_item("format", snake_case(&spec.prompt.format())?)?;
    d.set_item("max_steps", spec.max_steps)?;
    d.set_item("failure_reward", spec.reward.failure_reward)?;
    d.set_item("seeds", spec.dataset.seeds.clone())?;
    d.set_item("extract", snake_case(&spec.action.extract)?)?;
    d.set_item("max_new_tokens", spec.action.max_new_tokens)?;
    d.set_item("stop", spec.action.stop.clone())?;
    Ok(d.unbind())
}

/// The spec-file spelling of an enum value (its serde name).
fn snake_case(value: &impl serde::Serialize) -> PyResult<String> {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => Ok(s),
        // A variant with data (`{"wasm": {...}}`): its name.
        Ok(serde_json::Value::Object(map)) if map.len() == 1 => Ok(map.keys().next().cloned().unwrap_or_default()),
        Ok(other) => Ok(other.to_string()),
        Err(e) => Err(PyRuntimeError::new_err(e.to_string())),
    }
}

/// One diagnostic for Python: (line, column, message, help).
type Located = (Option<usize>, Option<usize>, String, Option<String>);

/// `SpecError` with the CLI's text and the diagnostics as attributes.
fn spec_error(py: Python<'_>, e: &envspec::SpecError) -> PyErr {
    let err = SpecError::new_err(e.to_string());
    let value = err.value(py);
    let diagnostics: Vec<Located> = e
        .diagnostics
        .iter()
        .map(|d| (d.pos.map(|p| p.line), d.pos.map(|p| p.col), d.message.clone(), d.help.clone()))
        .collect();
    // Setting attributes on a fresh exception instance cannot fail short of memory exhaustion;
    // the message alone is still the whole report if it does.
    let _ = value.setattr("file", e.file.clone().into_os_string());
    let _ = value.setattr("diagnostics", diagnostics);
    err
}

/// etpo's environments, natively (use the `etpo` package, which wraps them as Gymnasium
/// environments).
#[pymodule]
mod _etpo {
    #[pymodule_export]
    use super::{check, configure, find_specs, sandbox, Env, EnvError, SpecError, Task};
}
