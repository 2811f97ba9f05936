//! `etpo bench sandbox`.

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<i32> {
    anyhow::bail!("`etpo bench sandbox` is not built yet")
}
