//! `etpo check PATH...`: validate spec files (or the `*.yaml`/`*.yml` files directly inside
//! folders). Prints `ok: FILE` for each good file; at the first bad file prints every error in
//! it, `file:line:col: error: ...`, and exits with status 1.

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
    for file in files {
        match envspec::load(&file) {
            Ok(_) => println!("ok: {}", file.display()),
            Err(err) => {
                eprintln!("{err}");
                let n = err.diagnostics.len();
                eprintln!(
                    "{}: {n} error{}",
                    file.display(),
                    if n == 1 { "" } else { "s" }
                );
                return Ok(1);
            }
        }
    }
    Ok(0)
}
