//! The manifest: what an artifact is (service, version, kind, payload
//! digest and size, expiry), the rules its fields follow, and its
//! signature.

use super::*;

pub use crate::names::AGENT_NAME;

/// What an artifact delivers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArtifactKind {
    /// A service release: `service.toml` and its files.
    #[default]
    Service,
    /// A release of `baton-agent` itself: the binary `baton-agent` at the
    /// top, which agents re-execute into (see the agent's `selfupgrade`).
    Agent,
}

impl ArtifactKind {
    /// `"service"` or `"agent"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Service => "service",
            Self::Agent => "agent",
        }
    }

    pub(super) fn is_service(&self) -> bool {
        *self == Self::Service
    }
}

impl std::str::FromStr for ArtifactKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "service" => Ok(Self::Service),
            "agent" => Ok(Self::Agent),
            _ => Err(format!("unknown artifact kind {s:?} (service | agent)")),
        }
    }
}

impl clap::ValueEnum for ArtifactKind {
    fn value_variants<'a>() -> &'a [Self] {
        &[Self::Service, Self::Agent]
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(
            clap::builder::PossibleValue::new(self.as_str()).help(match self {
                Self::Service => "a service release: service.toml and its files",
                Self::Agent => "a release of baton-agent itself",
            }),
        )
    }
}

/// What an artifact holds, signed by its maker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The service name (see [`validate_name`]); [`AGENT_NAME`] for an
    /// agent artifact.
    pub name: String,
    /// What the artifact delivers; absent means a service (so manifests
    /// signed before kinds existed keep their meaning and bytes).
    #[serde(default, skip_serializing_if = "ArtifactKind::is_service")]
    pub kind: ArtifactKind,
    /// The release version (see [`validate_version`]).
    pub version: String,
    /// Lowercase hex SHA-256 of the payload exactly as stored (compressed).
    pub payload_sha256: String,
    /// The payload's length in bytes, as stored (compressed).
    pub size: u64,
    /// When the artifact was packed, RFC 3339 in UTC.
    pub created: String,
    /// The [`PublicKey::key_id`] of the signing key; empty if unsigned.
    pub key_id: String,
    /// After this instant (RFC 3339, UTC) agents refuse to stage the
    /// artifact, so a coordinator cannot serve a stale one forever (the
    /// freeze attack). Absent only in manifests signed before expiry
    /// existed, which agents refuse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    /// The length of each piece of the payload (the last may be shorter);
    /// 0 (absent) in manifests packed before pieces existed.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub piece_size: u64,
    /// The lowercase hex SHA-256 of each piece, in order: what a download
    /// from another agent is checked against as it arrives.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pieces: Vec<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// How long a packed artifact stays valid unless told otherwise.
pub const DEFAULT_EXPIRY: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);

/// The longest an artifact may be valid (`baton artifact pack --expires-in`).
pub const MAX_EXPIRY: std::time::Duration = std::time::Duration::from_secs(10 * 365 * 24 * 3600);

impl Manifest {
    /// When the manifest expires; `None` when it carries no expiry.
    pub fn expires_at(&self) -> Option<SystemTime> {
        humantime::parse_rfc3339(self.expires.as_deref()?).ok()
    }

    /// Whether agents may stage it at `now`: `Err` says why not.
    pub fn check_fresh(&self, now: SystemTime) -> Result<(), String> {
        match (&self.expires, self.expires_at()) {
            (None, _) => {
                Err("its manifest carries no expiry (pack it again with this baton)".into())
            }
            (Some(text), Some(at)) if at <= now => Err(format!(
                "its manifest expired at {text} (sign a fresh one with baton artifact pack)"
            )),
            (Some(_), Some(_)) => Ok(()),
            (Some(text), None) => Err(format!("its manifest's expiry {text:?} is not a time")),
        }
    }
}

impl Manifest {
    /// Checks the field rules [`SignedManifest::parse`] enforces.
    pub(super) fn validate(&self) -> Result<(), ArtifactError> {
        validate_name(&self.name)?;
        validate_version(&self.version)?;
        check_kind(&self.name, self.kind)?;
        if let Some(text) = &self.expires
            && self.expires_at().is_none()
        {
            return Err(ArtifactError::BadManifest {
                reason: format!("expires {:?} is not an RFC 3339 time", shorten(text)),
            });
        }
        if !crate::hex::is_lower(&self.payload_sha256, 64) {
            return Err(ArtifactError::BadManifest {
                reason: format!(
                    "payload_sha256 {:?} is not 64 lowercase hex digits",
                    shorten(&self.payload_sha256)
                ),
            });
        }
        self.validate_pieces()?;
        if !self.key_id.is_empty() && !crate::hex::is_lower(&self.key_id, 16) {
            return Err(ArtifactError::BadManifest {
                reason: format!(
                    "key_id {:?} is not 16 lowercase hex digits",
                    shorten(&self.key_id)
                ),
            });
        }
        Ok(())
    }
}

/// A manifest together with the exact bytes that were signed and the
/// signature. The bytes, not a re-serialization, are what is verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedManifest {
    /// The parsed manifest.
    pub manifest: Manifest,
    /// The exact JSON bytes that were signed.
    pub bytes: Vec<u8>,
    /// The Ed25519 signature over `bytes`; empty if unsigned.
    pub signature: Vec<u8>,
}

impl SignedManifest {
    /// Serializes `manifest` and signs it with `key`. The manifest is taken
    /// as given: its `key_id` should be `key.public_key().key_id()`.
    pub fn sign(manifest: Manifest, key: &SigningKey) -> Result<Self, ArtifactError> {
        manifest.validate()?;
        let bytes =
            serde_json::to_vec_pretty(&manifest).map_err(|e| ArtifactError::BadManifest {
                reason: e.to_string(),
            })?;
        let signature = key.sign(&bytes);
        Ok(Self {
            manifest,
            bytes,
            signature,
        })
    }

    /// Parses manifest bytes and checks its fields (name and version syntax,
    /// digest format). Does not check the signature; see [`Self::verify`].
    pub fn parse(bytes: Vec<u8>, signature: Vec<u8>) -> Result<Self, ArtifactError> {
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| ArtifactError::BadManifest {
                reason: e.to_string(),
            })?;
        manifest.validate()?;
        Ok(Self {
            manifest,
            bytes,
            signature,
        })
    }

    /// Checks that the signature over `bytes` verifies against at least one
    /// of the `trusted` keys, and that `manifest` is what `bytes` say.
    pub fn verify(&self, trusted: &[PublicKey]) -> Result<(), ArtifactError> {
        let name = || self.manifest.name.clone();
        let version = || self.manifest.version.clone();
        if self.signature.is_empty() {
            return Err(ArtifactError::Unsigned {
                name: name(),
                version: version(),
            });
        }
        // The fields are public, so a caller could have edited `manifest`
        // after parsing; the signature only vouches for `bytes`.
        let signed: Option<Manifest> = serde_json::from_slice(&self.bytes).ok();
        if signed.as_ref() != Some(&self.manifest) {
            return Err(ArtifactError::ManifestMismatch {
                name: name(),
                version: version(),
            });
        }
        let verifies = trusted.iter().any(|key| {
            UnparsedPublicKey::new(&signature::ED25519, key.as_bytes())
                .verify(&self.bytes, &self.signature)
                .is_ok()
        });
        if verifies {
            return Ok(());
        }
        let key_id = self.manifest.key_id.clone();
        if trusted.iter().any(|key| key.key_id() == key_id) {
            Err(ArtifactError::BadSignature {
                name: name(),
                version: version(),
                key_id,
            })
        } else {
            Err(ArtifactError::UntrustedKey {
                name: name(),
                version: version(),
                key_id,
                trusted: trusted.len(),
            })
        }
    }
}

/// Checks a name-like token against [`crate::names`]'s grammar (plus
/// `extra`).
pub(super) fn validate_token(
    what: &'static str,
    value: &str,
    extra: Option<char>,
) -> Result<(), ArtifactError> {
    crate::names::check(value, extra).map_err(|reason| ArtifactError::InvalidName {
        what,
        value: shorten(value),
        reason,
    })
}

/// Checks a service name: 1–128 characters from `[A-Za-z0-9._-]`, starting
/// with a letter or digit (so never `.` or `..`). Names become directory
/// names on hosts, hence the strict syntax.
pub fn validate_name(name: &str) -> Result<(), ArtifactError> {
    validate_token("service name", name, None)
}

/// Checks a version: see [`crate::version::check`].
pub fn validate_version(version: &str) -> Result<(), ArtifactError> {
    crate::version::check(version).map_err(|reason| ArtifactError::InvalidName {
        what: "version",
        value: shorten(version),
        reason,
    })
}
