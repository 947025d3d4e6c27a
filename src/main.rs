//! The `friendhook` binary: parse the command line, set up logging, hand over to the library.

use std::io::IsTerminal;

use friendhook::config::{Cli, Command, LogFormat};

/// jemalloc rather than the platform's malloc: after a large reconciliation report, glibc kept the
/// freed memory in the arena of each thread that had run one (seven full reports in a row at a
/// million rows took a service to 667-713 MB, one alone to ~450 MB); jemalloc reuses it across
/// threads and hands it back to the system within seconds.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse_or_exit();
    let (filter, not_understood) = friendhook::config::log_filter(std::env::var("RUST_LOG").ok().as_deref());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        // Fields beside the message rather than under "fields": what log collectors index.
        LogFormat::Json => logs.json().flatten_event(true).with_current_span(false).with_span_list(true).init(),
    }
    friendhook::console::set_format(cli.log_format);
    if let Some(warning) = not_understood {
        tracing::warn!("{warning}");
    }
    let result = match cli.command {
        Command::Serve(args) => friendhook::commands::serve::run(*args).await,
        Command::Demo(args) => friendhook::commands::demo::run(args).await,
        Command::Sandbox(args) => friendhook::sandbox::run(args).await,
        Command::Reconcile(args) => match friendhook::commands::reconcile::run(args).await {
            Ok(code) => return std::process::ExitCode::from(code),
            Err(e) => Err(e),
        },
        Command::Export(args) => match friendhook::commands::export::run(args).await {
            Ok(code) => return std::process::ExitCode::from(code),
            Err(e) => Err(e),
        },
        Command::Quarantine(args) => match friendhook::commands::quarantine::run(args).await {
            Ok(code) => return std::process::ExitCode::from(code),
            Err(e) => Err(e),
        },
        Command::Bench(args) => friendhook::bench::run(args).await,
        Command::Audit(args) => match friendhook::commands::audit::run(args).await {
            Ok(code) => return std::process::ExitCode::from(code),
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            match cli.log_format {
                LogFormat::Text => friendhook::console::to_stderr(format_args!("error: {err:#}\n")),
                // A log collector reads every line as JSON, the one that says why it stopped too.
                LogFormat::Json => tracing::error!(error = %format!("{err:#}"), "friendhook stopped with an error"),
            }
            std::process::ExitCode::from(friendhook::commands::exit_status_of(&err))
        }
    }
}
