//! `mesh-sample`: runs one of the sample apps.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use mesh_samples::{App, Upstream, router, serve};

#[derive(Parser)]
#[command(name = "mesh-sample", about = "Runs one of the mesh's sample apps")]
struct Cli {
    #[arg(value_enum)]
    app: Which,
    /// The app's version (reviews: v1, v2 or v3; callme, caller).
    #[arg(long, env = "VERSION", default_value = "v1")]
    version: String,
    /// Where to listen (default: all addresses, on the app's usual port).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// An explicit HTTP proxy for calls to other services (HOST:PORT or
    /// http://HOST:PORT).
    #[arg(long, env = "HTTP_PROXY")]
    proxy: Option<String>,
    /// caller: where callme is.
    #[arg(long, env = "CALLME_URL", default_value = "http://callme-service:8091")]
    callme_url: String,
    /// The name reviews reports as its pod.
    #[arg(long, env = "HOSTNAME")]
    name: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Which {
    Productpage,
    Details,
    Reviews,
    Ratings,
    Callme,
    Caller,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let app = match cli.app {
        Which::Productpage => App::Productpage,
        Which::Details => App::Details,
        Which::Reviews => App::Reviews {
            version: cli.version.clone(),
        },
        Which::Ratings => App::Ratings,
        Which::Callme => App::Callme {
            version: cli.version.clone(),
        },
        Which::Caller => App::Caller {
            version: cli.version.clone(),
            callme_url: cli.callme_url.clone(),
        },
    };
    let proxy = match cli.proxy.as_deref().filter(|p| !p.is_empty()) {
        None => None,
        Some(p) => {
            let hostport = p.strip_prefix("http://").unwrap_or(p).trim_end_matches('/');
            match hostport.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    eprintln!("mesh-sample: --proxy {p:?}: expected HOST:PORT with an IP address");
                    return ExitCode::from(64);
                }
            }
        }
    };
    let listen = cli
        .listen
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], app.default_port())));
    let name = cli.name.unwrap_or_else(|| {
        let app = clap::ValueEnum::to_possible_value(&cli.app)
            .map(|v| v.get_name().to_string())
            .unwrap_or_default();
        format!("{app}-{}", cli.version)
    });
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mesh-sample: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("mesh-sample: cannot listen on {listen}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let r = router(app, Upstream::new(proxy), name);
        tokio::select! {
            r = serve(listener, r) => match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => { eprintln!("mesh-sample: {e}"); ExitCode::FAILURE }
            },
            _ = tokio::signal::ctrl_c() => ExitCode::SUCCESS,
        }
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
