//! Episode history in states: what templates see as `history`, the `prompt.max_tokens` budget
//! (oldest turns left out first, a clear error when even the bare state does not fit), and
//! restoring a data task's episode from its log with the same history it had.

use std::path::Path;
use std::sync::Arc;

use envspec::{Prompt, Turn};
use runtime::env::{Host, Task, TokenCounter};
use runtime::PoolConfig;

fn text(p: &Prompt) -> &str {
    match p {
        Prompt::Completion(t) => t,
        Prompt::Chat(_) => panic!("completion expected"),
    }
}

/// A Balance Scale task whose reflection lists the episode's failed actions.
fn data_task(dir: &Path, budget: &str) -> Task {
    let path = dir.join("history.yaml");
    std::fs::write(
        &path,
        format!(
            "name: history
description: t
dataset:
  source:
    builtin: balance_scale
  max_samples: 60
prompt:
{budget}  template: \"start\"
  reflection: \"{{% if history_omitted %}}({{{{ history_omitted }}}} left out) {{% endif %}}{{% for t in history %}}[{{{{ t.step }}}}: {{{{ t.action }}}} -> {{{{ t.error.splitlines()[-1] }}}}]{{% endfor %}}\"
action:
  extract: first_line
  assemble: |
    def build_model(x_train, y_train):
        {{{{ action }}}}
max_steps: 5
"
        ),
    )
    .unwrap();
    let spec = envspec::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let python = runtime::default_python();
    Task::load(Arc::new(spec), &Host::new(PoolConfig { workers: 1, python, ..PoolConfig::default() })).unwrap()
}

#[test]
fn a_data_episode_shows_its_history_and_restores_it_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let task = data_task(dir.path(), "");
    let mut env = task.env(0).unwrap();
    assert_eq!(text(&env.reset().unwrap().prompt), "start");
    let a = env.step("raise ValueError('one')").unwrap();
    assert_eq!(text(&a.observation.prompt), "[0: raise ValueError('one') -> ValueError: one]");
    let b = env.step("raise KeyError('two')").unwrap();
    assert_eq!(
        text(&b.observation.prompt),
        "[0: raise ValueError('one') -> ValueError: one][1: raise KeyError('two') -> KeyError: 'two']"
    );
    assert_eq!(env.history().len(), 2);

    // Resuming from the log: the same turns give the same state, byte for byte, and the
    // episode goes on from it as the uninterrupted one does.
    let turns: Vec<Turn> = env.history().to_vec();
    let mut resumed = task.env(0).unwrap();
    resumed.reset().unwrap();
    assert_eq!(resumed.restore(&turns).unwrap(), b.observation);
    let (x, y) = (env.step("raise OSError('three')").unwrap(), resumed.step("raise OSError('three')").unwrap());
    assert_eq!(x.observation, y.observation);

    // A new episode starts with an empty history.
    assert_eq!(text(&env.reset().unwrap().prompt), "start");
    assert!(env.history().is_empty());
}

#[test]
fn the_budget_leaves_out_the_oldest_turns_first() {
    let dir = tempfile::tempdir().unwrap();
    // One "token" per character, as a tokenizer would count them.
    let chars: TokenCounter = Arc::new(|p: &Prompt| Ok(text(p).chars().count()));
    let mut task = data_task(dir.path(), "  max_tokens: 90\n");
    task.set_token_counter(chars);
    let mut env = task.env(0).unwrap();
    env.reset().unwrap();
    let one = "[0: raise ValueError('one') -> ValueError: one]"; // 47 characters
    assert_eq!(text(&env.step("raise ValueError('one')").unwrap().observation.prompt), one);
    // Two turns are 90+ characters: the first is left out, and the state says so.
    let b = env.step("raise KeyError('two')").unwrap();
    assert_eq!(text(&b.observation.prompt), "(1 left out) [1: raise KeyError('two') -> KeyError: 'two']");

    // A state that does not fit even without its history is an error naming the spec and step.
    let mut task = data_task(dir.path(), "  max_tokens: 8\n");
    task.set_token_counter(Arc::new(|p: &Prompt| Ok(text(p).chars().count())));
    let mut env = task.env(0).unwrap();
    env.reset().unwrap();
    let e = env.step("raise ValueError('one')").map(|_| ()).unwrap_err().to_string();
    assert!(e.starts_with("history: "), "{e}");
    assert!(
        e.ends_with("the state after step 1 is 13 tokens even without its history, over prompt.max_tokens = 8; raise it or shorten the templates"),
        "{e}"
    );
    // The first state too, at reset; without a tokenizer the state is measured in bytes.
    let task = data_task(dir.path(), "  max_tokens: 3\n");
    let e = task.env(0).unwrap().reset().unwrap_err().to_string();
    assert!(e.ends_with("the state after step 0 is 5 bytes (no tokenizer given), over prompt.max_tokens = 3; raise it or shorten the templates"), "{e}");
}
