//! `baton artifact keygen | pack | push | list`: signed releases.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use baton_common::artifact;
use baton_proto::control::v1::{
    ArtifactHeader, ListArtifactsRequest, PushArtifactRequest, push_artifact_request,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{Cli, CliError, call_failed};

/// Bytes per upload message.
const CHUNK: usize = 1 << 20;

/// `baton artifact …`
#[derive(Debug, clap::Subcommand)]
pub enum ArtifactCommand {
    /// Create an ed25519 release key: PREFIX.key (secret, mode 0600) and
    /// PREFIX.pub (give it to agents with --trusted-key).
    #[command(
        after_help = "Example:\n  baton artifact keygen --out release      # writes release.key (secret) and release.pub"
    )]
    Keygen {
        /// Path prefix of the two files.
        #[arg(long, value_name = "PREFIX")]
        out: PathBuf,
    },
    /// Pack and sign a release directory: a service's (it must hold
    /// service.toml) or, with `--kind agent`, a new baton-agent's (it must
    /// hold the executable `baton-agent`; roll it out with a plan naming
    /// the service `baton-agent`).
    #[command(
        after_help = "Examples:\n  baton artifact pack ./build --name api --version 2.0.0 --sign-key release.key --out api-2.0.0.baton\n  baton artifact pack ./agent-build --kind agent --version 0.2.0 --sign-key release.key --out agent.baton"
    )]
    Pack {
        /// The release directory.
        dir: PathBuf,
        /// The service's name (for `--kind agent` always `baton-agent`,
        /// which may be left out).
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        /// What the artifact delivers.
        #[arg(long, value_enum, default_value_t = artifact::ArtifactKind::Service)]
        kind: artifact::ArtifactKind,
        /// How long agents will stage it; after that it must be signed
        /// again (a stale artifact cannot be replayed forever).
        #[arg(long, value_name = "DURATION", default_value = "365days", value_parser = humantime::parse_duration)]
        expires_in: std::time::Duration,
        /// The release's version.
        #[arg(long, value_name = "VERSION")]
        version: String,
        /// The secret key from `baton artifact keygen`.
        #[arg(long, value_name = "KEY")]
        sign_key: PathBuf,
        /// Where to write the artifact.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Upload an artifact to the coordinator; prints its digest. With
    /// `--origin`, only its manifest: agents fetch the file from there.
    #[command(
        after_help = "Examples:\n  baton artifact push api-2.0.0.baton\n  # The file is on a web server or in S3; batond stores only its manifest:\n  baton artifact push api-2.0.0.baton --origin https://releases.example/api-2.0.0.baton"
    )]
    Push {
        /// The artifact file from `baton artifact pack`.
        file: PathBuf,
        /// Where agents download this very file from instead of batond: an
        /// http:// or https:// URL (an S3 object by its https or presigned
        /// URL) or s3://BUCKET/KEY for a public S3 object. Upload the file
        /// there first; agents check every piece against the signed
        /// manifest, so the origin is trusted for nothing.
        #[arg(long, value_name = "URL")]
        origin: Option<String>,
        /// Print the stored artifact as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the artifacts the coordinator stores.
    #[command(after_help = "Example:\n  baton artifact list")]
    List {
        /// Print one JSON document (an array).
        #[arg(long)]
        json: bool,
    },
}

/// Runs an artifact command.
pub async fn run(cli: &Cli, cmd: &ArtifactCommand) -> Result<ExitCode, CliError> {
    match cmd {
        ArtifactCommand::Keygen { out } => {
            let (key, public) = artifact::keygen(out)?;
            println!("wrote {} (secret) and {}", key.display(), public.display());
        }
        ArtifactCommand::Pack {
            dir,
            name,
            kind,
            expires_in,
            version,
            sign_key,
            out,
        } => {
            let name = match (name, kind) {
                (Some(name), _) => name.as_str(),
                (None, artifact::ArtifactKind::Agent) => artifact::AGENT_NAME,
                (None, artifact::ArtifactKind::Service) => {
                    return Err(CliError::new("--name is required for a service artifact"));
                }
            };
            let key = artifact::read_signing_key(sign_key)?;
            let signed = artifact::pack_kind(dir, name, version, *kind, *expires_in, &key, out)?;
            println!(
                "packed {} {} into {}: sha256:{} ({} bytes, key {})",
                name,
                version,
                out.display(),
                signed.manifest.payload_sha256,
                signed.manifest.size,
                signed.manifest.key_id
            );
        }
        ArtifactCommand::Push { file, origin, json } => {
            let a = match origin {
                None => push(cli, file).await?,
                Some(url) => push_origin(cli, file, url).await?,
            };
            if *json {
                println!("{}", serde_json::to_string_pretty(&to_json(&a))?);
            } else {
                println!("{}", a.digest);
            }
        }
        ArtifactCommand::List { json } => {
            let mut client = cli.control().await?;
            let all = client
                .list_artifacts(ListArtifactsRequest {})
                .await
                .map_err(|s| call_failed("listing artifacts failed", s))?
                .into_inner()
                .artifacts;
            if *json {
                let doc: Vec<_> = all.iter().map(to_json).collect();
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else if all.is_empty() {
                println!("no artifacts (push one with `baton artifact push FILE`)");
            } else {
                let mut table = crate::table::Table::new(["NAME", "VERSION", "SIZE", "DIGEST"]);
                for a in &all {
                    table.row([
                        a.name.clone(),
                        a.version.clone(),
                        a.size.to_string(),
                        a.digest.clone(),
                    ]);
                }
                table.right(2);
                print!("{table}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn to_json(a: &baton_proto::control::v1::Artifact) -> serde_json::Value {
    serde_json::json!({
        "name": a.name,
        "version": a.version,
        "digest": a.digest,
        "size": a.size,
        "created": a.created,
        "key_id": a.key_id,
        "origin": (!a.origin.is_empty()).then_some(&a.origin),
    })
}

/// Records the artifact at `file` with its payload at `origin`: only the
/// manifest goes to the coordinator.
pub async fn push_origin(
    cli: &Cli,
    file: &std::path::Path,
    origin: &str,
) -> Result<baton_proto::control::v1::Artifact, CliError> {
    let (signed, _) = artifact::open_artifact(file)?;
    let mut client = cli.control().await?;
    let header = PushArtifactRequest {
        kind: Some(push_artifact_request::Kind::Header(ArtifactHeader {
            manifest: signed.bytes,
            signature: signed.signature,
            origin: origin.to_owned(),
        })),
    };
    Ok(client
        .push_artifact(tokio_stream::iter([header]))
        .await
        .map_err(|s| call_failed("pushing the artifact failed", s))?
        .into_inner())
}

/// Uploads the artifact at `file`, streaming its payload from disk.
pub async fn push(
    cli: &Cli,
    file: &std::path::Path,
) -> Result<baton_proto::control::v1::Artifact, CliError> {
    let (signed, payload) = artifact::open_artifact(file)?;
    let mut client = cli.control_without_timeout().await?;
    push_with(&mut client, signed, payload).await
}

/// Uploads an opened artifact over `client`.
pub async fn push_with(
    client: &mut baton_proto::control::v1::control_service_client::ControlServiceClient<
        tonic::transport::Channel,
    >,
    signed: artifact::SignedManifest,
    mut payload: std::fs::File,
) -> Result<baton_proto::control::v1::Artifact, CliError> {
    let (tx, rx) = mpsc::channel(4);
    let header = PushArtifactRequest {
        kind: Some(push_artifact_request::Kind::Header(ArtifactHeader {
            manifest: signed.bytes,
            signature: signed.signature,
            origin: String::new(),
        })),
    };
    // Reading the file happens on a blocking thread; the channel's bound
    // keeps memory at a few chunks however large the artifact is.
    let reader = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        if tx.blocking_send(header).is_err() {
            return Ok(());
        }
        loop {
            let mut buf = vec![0; CHUNK];
            let mut filled = 0;
            while filled < CHUNK {
                match payload.read(&mut buf[filled..])? {
                    0 => break,
                    n => filled += n,
                }
            }
            if filled == 0 {
                return Ok(());
            }
            buf.truncate(filled);
            let msg = PushArtifactRequest {
                kind: Some(push_artifact_request::Kind::Chunk(buf)),
            };
            if tx.blocking_send(msg).is_err() {
                return Ok(());
            }
        }
    });
    let result = client.push_artifact(ReceiverStream::new(rx)).await;
    reader
        .await
        .map_err(|e| CliError::new(format!("the upload reader failed: {e}")))?
        .map_err(|e| CliError::new(format!("cannot read the artifact: {e}")))?;
    Ok(result
        .map_err(|s| call_failed("pushing the artifact failed", s))?
        .into_inner())
}
