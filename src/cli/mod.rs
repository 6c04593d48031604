//! The command line: clap types ([`args`]), the recipe file applied as flags, and one file per
//! command that maps its flags onto the library's types, calls the library and prints
//! ([`print`] holds every table). No policy lives here: what an unset option means is decided
//! by the library ([`comq_gpu::quant::Preset`], [`comq_gpu::pipeline`]).

mod args;
mod bench;
mod devices;
mod eval;
mod inspect;
mod print;
mod run;

use std::path::PathBuf;

use anyhow::Result;
pub use args::{Cli, Command};
use comq_gpu::recipe::Recipe;

/// Sets up `env_logger` from -v/-q (RUST_LOG still wins).
pub fn init_logging(cli: &Cli) {
    let level = if cli.quiet {
        "error"
    } else {
        match cli.verbose {
            0 => "warn",
            1 => "info",
            _ => "debug",
        }
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_timestamp(None)
        .init();
}

/// Parses the command line, then fills in what a `--config` recipe gives: every top-level key
/// of the recipe is the long name of a flag of the subcommand (`_` or `-`), applied as if it
/// were given unless the command line gives that flag itself. A key that is no flag is an error
/// that names the key and its line. `[[layer]]` rules are read by the subcommand.
pub fn parse_with_recipe(argv: Vec<std::ffi::OsString>) -> Result<Cli> {
    use clap::{parser::ValueSource, CommandFactory, FromArgMatches};
    let cmd = Cli::command();
    let m = cmd.clone().get_matches_from(argv.clone());
    let cli = Cli::from_arg_matches(&m)?;
    let Some((sub, sm)) = m.subcommand() else {
        return Ok(cli);
    };
    let Some(path) = sm.try_get_one::<PathBuf>("config").ok().flatten().cloned() else {
        return Ok(cli);
    };
    let text = std::fs::read_to_string(&path).map_err(|e| comq_gpu::Error::io(&path, e))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| {
        comq_gpu::Error::InvalidOption(format!("{}: not a valid recipe: {e}", path.display()))
    })?;
    let subcmd = cmd
        .find_subcommand(sub)
        .expect("the parsed subcommand exists");
    let mut extra: Vec<std::ffi::OsString> = Vec::new();
    for (key, value) in &table {
        if key == "layer" {
            continue;
        }
        let line = Recipe::line_of(&text, key);
        let long = key.replace('_', "-");
        let Some(arg) = subcmd
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()))
        else {
            anyhow::bail!(comq_gpu::Error::InvalidOption(format!(
                "{} line {line}: '{key}' is not a flag of `comq-gpu {sub}` (see --help; \
                 per-layer settings go in [[layer]] tables)",
                path.display()
            )));
        };
        if sm.value_source(arg.get_id().as_str()) == Some(ValueSource::CommandLine) {
            continue;
        }
        let flag = format!("--{long}");
        let takes_value = arg.get_action().takes_values();
        match value {
            toml::Value::Boolean(b) if !takes_value => {
                if *b {
                    extra.push(flag.into());
                }
            }
            toml::Value::String(t) => extra.extend([flag.into(), t.into()]),
            toml::Value::Integer(i) => extra.extend([flag.into(), i.to_string().into()]),
            toml::Value::Float(f) => extra.extend([flag.into(), f.to_string().into()]),
            toml::Value::Array(a) => {
                let parts: Vec<String> = a
                    .iter()
                    .map(|v| match v {
                        toml::Value::String(t) => t.clone(),
                        toml::Value::Integer(i) => i.to_string(),
                        toml::Value::Float(f) => f.to_string(),
                        toml::Value::Boolean(b) => b.to_string(),
                        other => format!("{other:?}"),
                    })
                    .collect();
                extra.extend([flag.into(), parts.join(",").into()]);
            }
            other => anyhow::bail!(comq_gpu::Error::InvalidOption(format!(
                "{} line {line}: '{key} = {other:?}' is not a value --{long} takes",
                path.display()
            ))),
        }
    }
    if extra.is_empty() {
        return Ok(cli);
    }
    let mut all = argv;
    all.extend(extra);
    let m = cmd.try_get_matches_from(all).map_err(|e| {
        comq_gpu::Error::InvalidOption(format!(
            "{}: {}",
            path.display(),
            e.to_string().trim_start_matches("error: ").trim_end()
        ))
    })?;
    Ok(Cli::from_arg_matches(&m)?)
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(a) => run::run_cmd(*a, cli.quiet),
        Command::Inspect(a) => inspect::inspect_cmd(a),
        Command::Devices { json } => devices::devices_cmd(json),
        Command::Bench(a) => bench::bench_cmd(a),
        Command::Eval(a) => eval::eval_cmd(a),
    }
}
