//! `etpo schema`: print the JSON Schema of the spec format (for editors' YAML validation, e.g.
//! `# yaml-language-server: $schema=./envspec.schema.json` after `etpo schema > envspec.schema.json`).

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<i32> {
    println!("{}", serde_json::to_string_pretty(&envspec::schema())?);
    Ok(0)
}
