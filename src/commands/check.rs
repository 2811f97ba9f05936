//! `etpo check PATH...`: validate spec files (or the `*.yaml`/`*.yml` files directly inside
//! folders). Prints `ok: FILE` for each good file; at the first bad file prints every error in
//! it, `file:line:col: error: ...`, and exits with status 1. The game of a `kind: wasm` spec is
//! compiled and asked its name, so a module that is not a valid game fails here too.

use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Spec files, or folders whose *.yaml / *.yml files are checked (not recursively).
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    let files = match envspec::find_specs(&args.paths) {
        Ok(files) => files,
        Err(err) => {
            eprintln!("{err}");
            return Ok(1);
        }
    };
    // Started only if a spec has a game.
    let host = runtime::env::Host::new(runtime::PoolConfig::default());
    for file in files {
        match envspec::load(&file) {
            Ok(spec) if spec.kind.game().is_some() => {
                match runtime::env::Task::load(std::sync::Arc::new(spec), &host) {
                    Ok(task) => {
                        let game =
                            task.game().map(|g| format!(" (game {} {})", g.name(), g.version())).unwrap_or_default();
                        println!("ok: {}{game}", file.display());
                    }
                    Err(err) => {
                        eprintln!("{}: error: {err}", file.display());
                        return Ok(1);
                    }
                }
            }
            Ok(_) => println!("ok: {}", file.display()),
            Err(err) => {
                eprintln!("{err}");
                let n = err.diagnostics.len();
                eprintln!("{}: {n} error{}", file.display(), if n == 1 { "" } else { "s" });
                return Ok(1);
            }
        }
    }
    Ok(0)
}
