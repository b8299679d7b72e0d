//! Tests of the artifact format: keys, manifests, packing, streaming
//! verification and the refusing unpacker.

use super::*;
use std::os::unix::fs::symlink;

/// A fresh key pair in `dir`.
fn keys(dir: &Path, name: &str) -> (SigningKey, PublicKey) {
    let (key, public) = keygen(&dir.join(name)).unwrap();
    (
        read_signing_key(&key).unwrap(),
        read_public_key(&public).unwrap(),
    )
}

/// A small service directory: a config, an executable, a data file in a
/// subdirectory and a symlink to the executable.
fn service_dir(root: &Path) -> PathBuf {
    let dir = root.join("svc");
    fs::create_dir_all(dir.join("bin")).unwrap();
    fs::create_dir_all(dir.join("share/data")).unwrap();
    fs::write(dir.join("service.toml"), "name = \"api\"\n").unwrap();
    fs::write(dir.join("bin/run"), "#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(dir.join("bin/run"), Permissions::from_mode(0o755)).unwrap();
    fs::write(dir.join("share/data/table.txt"), "x".repeat(10_000)).unwrap();
    fs::set_permissions(
        dir.join("share/data/table.txt"),
        Permissions::from_mode(0o640),
    )
    .unwrap();
    symlink("bin/run", dir.join("current")).unwrap();
    dir
}

/// Hashes the rest of `file` and checks it against `manifest`.
fn hash_payload(mut file: File, manifest: &Manifest) -> Result<(), ArtifactError> {
    let mut hasher = PayloadHasher::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    hasher.clone().finish(manifest)
}

/// Packs the test service and returns the artifact path and key pair.
fn packed(root: &Path) -> (PathBuf, SigningKey, PublicKey) {
    let (key, public) = keys(root, "release");
    let out = root.join("api-1.2.0.art");
    pack(&service_dir(root), "api", "1.2.0", &key, &out).unwrap();
    (out, key, public)
}

#[test]
fn keygen_round_trips_and_refuses_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("release.v2");
    let (key_path, pub_path) = keygen(&prefix).unwrap();
    assert_eq!(key_path, tmp.path().join("release.v2.key"));
    assert_eq!(pub_path, tmp.path().join("release.v2.pub"));
    let mode = fs::metadata(&key_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(
        fs::read_to_string(&key_path)
            .unwrap()
            .starts_with("baton-ed25519-secret ")
    );
    assert!(
        fs::read_to_string(&pub_path)
            .unwrap()
            .starts_with("baton-ed25519-public ")
    );

    let key = read_signing_key(&key_path).unwrap();
    let public = read_public_key(&pub_path).unwrap();
    assert_eq!(key.public_key(), public);
    assert_eq!(public.key_id().len(), 16);
    assert!(format!("{key:?}").contains(&public.key_id()));

    let err = keygen(&prefix).unwrap_err().to_string();
    assert!(err.contains("release.v2.key already exists"), "{err}");
    assert!(err.contains("refusing to overwrite"), "{err}");
}

#[test]
fn garbled_key_files_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let (key_path, pub_path) = keygen(&tmp.path().join("k")).unwrap();

    let err = read_public_key(&key_path).unwrap_err().to_string();
    assert!(err.contains("k.key is not a Baton public key"), "{err}");
    assert!(err.contains("holds a secret key"), "{err}");
    let err = read_signing_key(&pub_path).unwrap_err().to_string();
    assert!(err.contains("k.pub is not a Baton secret key"), "{err}");

    let junk = tmp.path().join("junk.pub");
    fs::write(&junk, "ssh-ed25519 AAAA\n").unwrap();
    let err = read_public_key(&junk).unwrap_err().to_string();
    assert!(err.contains("junk.pub is not a Baton public key"), "{err}");
    fs::write(&junk, "baton-ed25519-public abcd\n").unwrap();
    let err = read_public_key(&junk).unwrap_err().to_string();
    assert!(err.contains("the key is 2 bytes, not 32"), "{err}");
    fs::write(&junk, "baton-ed25519-secret zz\n").unwrap();
    let err = read_signing_key(&junk).unwrap_err().to_string();
    assert!(err.contains("not valid hex"), "{err}");
}

#[test]
fn names_and_versions_are_checked() {
    validate_name("api").unwrap();
    validate_name("my_svc-2.x").unwrap();
    validate_version("1.2.0+build.7").unwrap();
    let cases = [
        (validate_name(""), "it is empty"),
        (validate_name(".."), "must start with a letter or digit"),
        (validate_name("-x"), "must start with a letter or digit"),
        (validate_name("a/b"), "it contains '/'"),
        (validate_name("a+b"), "it contains '+'"),
        (validate_name(&"a".repeat(129)), "the limit is 128"),
        (validate_version("1 2"), "it contains ' '"),
        (validate_version("2"), "not a semantic version"),
        (validate_version("1.4"), "not a semantic version"),
        (
            validate_version("1.99999999999999999999.0"),
            "not a semantic version",
        ),
    ];
    for (result, want) in cases {
        let err = result.unwrap_err().to_string();
        assert!(err.contains(want), "{err} lacks {want}");
    }
}

#[test]
fn pack_open_verify_hash_unpack_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, _key, public) = packed(tmp.path());

    let (signed, file) = open_artifact(&out).unwrap();
    assert_eq!(signed.manifest.name, "api");
    assert_eq!(signed.manifest.version, "1.2.0");
    assert_eq!(signed.manifest.key_id, public.key_id());
    assert!(signed.manifest.created.ends_with('Z'));
    signed.verify(std::slice::from_ref(&public)).unwrap();
    hash_payload(file, &signed.manifest).unwrap();

    let (_, file) = open_artifact(&out).unwrap();
    let dest = tmp.path().join("unpacked");
    let stats = unpack(file, &dest, &UnpackLimits::default()).unwrap();
    // service.toml, bin, bin/run, current, share, share/data, table.txt.
    assert_eq!(stats.entries, 7);
    assert_eq!(stats.bytes, 10_000 + 13 + 18);
    assert_eq!(
        fs::read_to_string(dest.join("bin/run")).unwrap(),
        "#!/bin/sh\necho hi\n"
    );
    assert_eq!(
        fs::read_to_string(dest.join("share/data/table.txt"))
            .unwrap()
            .len(),
        10_000
    );
    let mode = |p: &str| fs::metadata(dest.join(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("bin/run"), 0o755);
    assert_eq!(mode("share/data/table.txt"), 0o640);
    assert_eq!(mode(""), 0o755);
    assert_eq!(
        fs::read_link(dest.join("current")).unwrap(),
        Path::new("bin/run")
    );
    // No temporary files are left beside the artifact.
    let mut left: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            "api-1.2.0.art",
            "release.key",
            "release.pub",
            "svc",
            "unpacked"
        ]
    );
}

#[test]
fn pack_is_deterministic_apart_from_the_time() {
    let tmp = tempfile::tempdir().unwrap();
    let (key, _) = keys(tmp.path(), "k");
    let dir = service_dir(tmp.path());
    let a = pack(&dir, "api", "1.0.0", &key, &tmp.path().join("a.art")).unwrap();
    let b = pack(&dir, "api", "1.0.0", &key, &tmp.path().join("b.art")).unwrap();
    assert_eq!(a.manifest.payload_sha256, b.manifest.payload_sha256);
}

#[test]
fn an_expiry_is_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let (key, _) = keys(tmp.path(), "k");
    let dir = service_dir(tmp.path());
    let out = tmp.path().join("a.art");
    for expires_in in [
        std::time::Duration::ZERO,
        std::time::Duration::from_secs(u64::MAX),
    ] {
        let err = pack_kind(
            &dir,
            "api",
            "1.0.0",
            ArtifactKind::Service,
            expires_in,
            &key,
            &out,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("at most 10 years"), "{err}");
    }
}

#[test]
fn verify_refuses_a_wrong_key() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, key, _) = packed(tmp.path());
    let (_, other) = keys(tmp.path(), "other");
    let (signed, _) = open_artifact(&out).unwrap();
    let err = signed.verify(&[other]).unwrap_err().to_string();
    let want = format!(
        "artifact api 1.2.0 is signed by key {}, which is not among the 1 trusted keys",
        key.public_key().key_id()
    );
    assert_eq!(err, want);
}

#[test]
fn verify_refuses_an_unsigned_artifact() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, _, public) = packed(tmp.path());
    let (mut signed, mut file) = open_artifact(&out).unwrap();
    signed.signature.clear();
    let unsigned = tmp.path().join("unsigned.art");
    write_artifact(&unsigned, &signed, &mut file).unwrap();
    let (signed, _) = open_artifact(&unsigned).unwrap();
    let err = signed.verify(&[public]).unwrap_err().to_string();
    assert_eq!(err, "artifact api 1.2.0 is not signed");
}

#[test]
fn a_flipped_payload_byte_fails_the_digest() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, _, public) = packed(tmp.path());
    let mut bytes = fs::read(&out).unwrap();
    let last = bytes.len() - 10;
    bytes[last] ^= 0x01;
    fs::write(&out, &bytes).unwrap();

    let (signed, file) = open_artifact(&out).unwrap();
    signed.verify(&[public]).unwrap();
    let err = hash_payload(file, &signed.manifest)
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("payload digest is sha256:"), "{err}");
    assert!(
        err.ends_with(&format!(
            "but the manifest says sha256:{}",
            signed.manifest.payload_sha256
        )),
        "{err}"
    );
}

#[test]
fn an_edited_manifest_fails_the_signature() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, _, public) = packed(tmp.path());
    let (signed, _) = open_artifact(&out).unwrap();
    let text = String::from_utf8(signed.bytes.clone()).unwrap();
    let edited = text.replace("\"1.2.0\"", "\"1.2.1\"");
    assert_ne!(text, edited);
    let tampered = SignedManifest::parse(edited.into_bytes(), signed.signature.clone()).unwrap();
    let err = tampered
        .verify(std::slice::from_ref(&public))
        .unwrap_err()
        .to_string();
    assert!(err.contains("artifact api 1.2.1"), "{err}");
    assert!(err.contains("signature does not verify"), "{err}");

    // Editing the parsed fields without the bytes is caught too.
    let mut edited = signed.clone();
    edited.manifest.size += 1;
    let err = edited.verify(&[public]).unwrap_err().to_string();
    assert!(
        err.contains("do not match the signed manifest bytes"),
        "{err}"
    );
}

#[test]
fn open_refuses_bad_framing() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, _, _) = packed(tmp.path());
    let bytes = fs::read(&out).unwrap();

    let bad = tmp.path().join("bad.art");
    fs::write(&bad, b"NOTBATON!\nxxxx").unwrap();
    let err = open_artifact(&bad).unwrap_err().to_string();
    assert!(
        err.contains("bad.art is not a valid Baton artifact"),
        "{err}"
    );
    assert!(err.contains("magic"), "{err}");

    fs::write(&bad, &bytes[..bytes.len() - 1]).unwrap();
    let err = open_artifact(&bad).unwrap_err().to_string();
    assert!(err.contains("payload is"), "{err}");
    assert!(err.contains("but the manifest says"), "{err}");

    let mut huge = MAGIC.to_vec();
    huge.extend_from_slice(&(MAX_MANIFEST_BYTES + 1).to_be_bytes());
    fs::write(&bad, &huge).unwrap();
    let err = open_artifact(&bad).unwrap_err().to_string();
    assert!(
        err.contains("its manifest is 65537 bytes, above the limit"),
        "{err}"
    );

    fs::write(&bad, &bytes[..20]).unwrap();
    let err = open_artifact(&bad).unwrap_err().to_string();
    assert!(err.contains("the file ends inside the manifest"), "{err}");
}

#[test]
fn parse_checks_fields() {
    let manifest = |name: &str, digest: &str| {
        format!(
            r#"{{"name":"{name}","version":"1.0.0","payload_sha256":"{digest}","size":1,"created":"x","key_id":""}}"#
        )
        .into_bytes()
    };
    let good = "a".repeat(64);
    SignedManifest::parse(manifest("api", &good), vec![]).unwrap();
    let err = SignedManifest::parse(manifest("../x", &good), vec![])
        .unwrap_err()
        .to_string();
    assert!(err.contains("invalid service name \"../x\""), "{err}");
    let err = SignedManifest::parse(manifest("api", &"A".repeat(64)), vec![])
        .unwrap_err()
        .to_string();
    assert!(err.contains("payload_sha256"), "{err}");
    let mut extra = manifest("api", &good);
    extra.truncate(extra.len() - 1);
    extra.extend_from_slice(br#","evil":1}"#);
    let err = SignedManifest::parse(extra, vec![])
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown field `evil`"), "{err}");
}

#[test]
fn agent_artifacts_hold_an_executable_and_carry_their_kind_signed() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let (key, public) = keys(tmp.path(), "k");
    let dir = tmp.path().join("agent");
    fs::create_dir(&dir).unwrap();
    let out = tmp.path().join("a.art");
    let agent = |name: &str| {
        pack_kind(
            &dir,
            name,
            "2.0.0",
            ArtifactKind::Agent,
            DEFAULT_EXPIRY,
            &key,
            &out,
        )
    };
    let err = agent(AGENT_NAME).unwrap_err().to_string();
    assert!(
        err.contains("no executable regular file baton-agent"),
        "{err}"
    );
    fs::write(dir.join(AGENT_NAME), b"#!/bin/sh\n").unwrap();
    let err = agent(AGENT_NAME).unwrap_err().to_string();
    assert!(
        err.contains("no executable regular file baton-agent"),
        "{err}"
    );
    fs::set_permissions(dir.join(AGENT_NAME), fs::Permissions::from_mode(0o755)).unwrap();
    let err = agent("api").unwrap_err().to_string();
    assert!(err.contains("must be named baton-agent"), "{err}");
    let signed = agent(AGENT_NAME).unwrap();
    assert_eq!(signed.manifest.kind, ArtifactKind::Agent);
    assert!(String::from_utf8_lossy(&signed.bytes).contains("\"kind\": \"agent\""));
    let back = SignedManifest::parse(signed.bytes.clone(), signed.signature.clone()).unwrap();
    back.verify(&[public]).unwrap();
    assert_eq!(back.manifest.kind, ArtifactKind::Agent);

    // A service may not take the agent's name, and a service manifest
    // says nothing of kinds (its bytes are as before kinds existed).
    let svc = service_dir(tmp.path());
    let err = pack(&svc, AGENT_NAME, "1.0.0", &key, &out)
        .unwrap_err()
        .to_string();
    assert!(err.contains("reserved for agent artifacts"), "{err}");
    let signed = pack(&svc, "api", "1.0.0", &key, &out).unwrap();
    assert!(!String::from_utf8_lossy(&signed.bytes).contains("kind"));
}

#[test]
fn pack_refuses_a_non_service_dir_and_special_files() {
    let tmp = tempfile::tempdir().unwrap();
    let (key, _) = keys(tmp.path(), "k");
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let err = pack(&empty, "api", "1.0.0", &key, &tmp.path().join("a.art"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("empty has no regular file service.toml"),
        "{err}"
    );

    let dir = service_dir(tmp.path());
    let _socket = std::os::unix::net::UnixListener::bind(dir.join("ctl.sock")).unwrap();
    let err = pack(&dir, "api", "1.0.0", &key, &tmp.path().join("a.art"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot pack"), "{err}");
    assert!(err.contains("ctl.sock: it is a socket"), "{err}");
    assert!(!tmp.path().join("a.art").exists());

    fs::remove_file(dir.join("ctl.sock")).unwrap();
    symlink("../../etc", dir.join("bin/escape")).unwrap();
    let err = pack(&dir, "api", "1.0.0", &key, &tmp.path().join("a.art"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot pack symlink"), "{err}");
    assert!(err.contains("points outside the artifact"), "{err}");

    fs::remove_file(dir.join("bin/escape")).unwrap();
    let err = pack(&dir, "api", "1.0.0", &key, &dir.join("a.art"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("inside the directory being packed"), "{err}");
}

// --- Malicious payloads -------------------------------------------------

/// One raw tar entry; the name and link are written straight into the
/// header so that nothing sanitizes them.
struct Raw<'a> {
    name: &'a [u8],
    kind: tar::EntryType,
    mode: u32,
    link: &'a [u8],
    data: &'a [u8],
}

fn file(name: &[u8]) -> Raw<'_> {
    Raw {
        name,
        kind: tar::EntryType::Regular,
        mode: 0o644,
        link: b"",
        data: b"pwned\n",
    }
}

fn link<'a>(name: &'a [u8], target: &'a [u8]) -> Raw<'a> {
    Raw {
        name,
        kind: tar::EntryType::Symlink,
        mode: 0o777,
        link: target,
        data: b"",
    }
}

fn payload(entries: &[Raw<'_>]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for e in entries {
        let mut header = tar::Header::new_gnu();
        header.as_old_mut().name[..e.name.len()].copy_from_slice(e.name);
        header.as_old_mut().linkname[..e.link.len()].copy_from_slice(e.link);
        header.set_entry_type(e.kind);
        header.set_mode(e.mode);
        header.set_size(e.data.len() as u64);
        header.set_cksum();
        builder.append(&header, e.data).unwrap();
    }
    zstd::stream::encode_all(&builder.into_inner().unwrap()[..], 3).unwrap()
}

/// Every path under `root`, relative.
fn tree(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            out.push(path.strip_prefix(root).unwrap().display().to_string());
            if fs::symlink_metadata(&path).unwrap().is_dir() {
                stack.push(path);
            }
        }
    }
    out.sort();
    out
}

/// Unpacks `entries` into `TMP/jail/dest`, expects an error, checks
/// that nothing is left anywhere under TMP, and returns the message.
fn refused_with(entries: &[Raw<'_>], limits: &UnpackLimits) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let jail = tmp.path().join("jail");
    fs::create_dir(&jail).unwrap();
    let dest = jail.join("dest");
    let err = unpack(&payload(entries)[..], &dest, limits)
        .unwrap_err()
        .to_string();
    assert_eq!(tree(tmp.path()), ["jail"], "after: {err}");
    err
}

fn refused(entries: &[Raw<'_>]) -> String {
    refused_with(entries, &UnpackLimits::default())
}

#[test]
fn unpack_refuses_absolute_and_dotdot_paths() {
    let err = refused(&[file(b"/tmp/x")]);
    assert_eq!(
        err,
        "refusing to unpack entry \"/tmp/x\": its path is absolute"
    );
    let err = refused(&[file(b"../x")]);
    assert!(
        err.contains("entry \"../x\": its path has a `..` component"),
        "{err}"
    );
    let err = refused(&[file(b"ok"), file(b"a/../../x")]);
    assert!(
        err.contains("entry \"a/../../x\": its path has a `..` component"),
        "{err}"
    );
    let err = refused(&[file(b"./")]);
    assert!(err.contains("its path names no file"), "{err}");
}

#[test]
fn unpack_refuses_escaping_symlinks() {
    let err = refused(&[link(b"l", b"../../etc")]);
    assert!(err.contains("entry \"l\""), "{err}");
    assert!(err.contains("points outside the artifact"), "{err}");
    let err = refused(&[link(b"l", b"/etc")]);
    assert!(err.contains("its target \"/etc\" is absolute"), "{err}");
    let err = refused(&[link(b"s", b"."), link(b"x", b"s/..")]);
    assert!(err.contains("entry \"x\""), "{err}");
    assert!(err.contains("only leading `..` are allowed"), "{err}");
    let err = refused(&[link(b"l", b"")]);
    assert!(err.contains("its target is empty"), "{err}");
}

#[test]
fn unpack_never_writes_through_a_symlink() {
    let err = refused(&[link(b"d", b"."), file(b"d/x")]);
    assert!(
        err.contains("entry \"d/x\": its parent d is a symlink"),
        "{err}"
    );
    // A file replacing an existing link is refused as well.
    let err = refused(&[link(b"f", b"g"), file(b"f")]);
    assert!(
        err.contains("entry \"f\": its path already exists"),
        "{err}"
    );
}

#[test]
fn unpack_refuses_links_devices_and_fifos() {
    let hard = Raw {
        kind: tar::EntryType::Link,
        ..link(b"h", b"service.toml")
    };
    assert!(refused(&[hard]).contains("entry \"h\": it is a hard link"));
    let char_dev = Raw {
        kind: tar::EntryType::Char,
        data: b"",
        ..file(b"tty")
    };
    assert!(refused(&[char_dev]).contains("entry \"tty\": it is a character device"));
    let block = Raw {
        kind: tar::EntryType::Block,
        data: b"",
        ..file(b"sda")
    };
    assert!(refused(&[block]).contains("entry \"sda\": it is a block device"));
    let fifo = Raw {
        kind: tar::EntryType::Fifo,
        data: b"",
        ..file(b"pipe")
    };
    assert!(refused(&[fifo]).contains("entry \"pipe\": it is a fifo"));
    let contiguous = Raw {
        kind: tar::EntryType::Continuous,
        ..file(b"c")
    };
    assert!(refused(&[contiguous]).contains("unsupported entry type '7'"));
}

#[test]
fn unpack_refuses_setuid_and_setgid() {
    let setuid = Raw {
        mode: 0o4755,
        ..file(b"bin/su")
    };
    let err = refused(&[file(b"ok"), setuid]);
    assert_eq!(
        err,
        "refusing to unpack entry \"bin/su\": it has the set-uid bit"
    );
    let setgid = Raw {
        mode: 0o2755,
        ..file(b"sg")
    };
    assert!(refused(&[setgid]).contains("it has the set-gid bit"));
}

#[test]
fn unpack_enforces_the_limits() {
    let limits = UnpackLimits {
        max_entries: 2,
        max_bytes: 1_000,
    };
    let err = refused_with(&[file(b"a"), file(b"b"), file(b"c")], &limits);
    assert_eq!(err, "the payload has more than 2 entries, the limit");

    let big = vec![b'x'; 1_001];
    let limits = UnpackLimits {
        max_entries: 10,
        max_bytes: 1_000,
    };
    let err = refused_with(
        &[
            file(b"small"),
            Raw {
                data: &big,
                ..file(b"big")
            },
        ],
        &limits,
    );
    assert_eq!(
        err,
        "entry \"big\" takes the unpacked files past 1000 bytes, the limit"
    );
}

#[test]
fn unpack_refuses_an_existing_dest_and_garbage() {
    let tmp = tempfile::tempdir().unwrap();
    let err = unpack(
        &payload(&[file(b"a")])[..],
        tmp.path(),
        &UnpackLimits::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("already exists; unpack needs a fresh destination"),
        "{err}"
    );

    let dest = tmp.path().join("dest");
    let err = unpack(&b"not zstd at all"[..], &dest, &UnpackLimits::default())
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("cannot read the artifact payload"), "{err}");
    assert!(!dest.exists());
}

#[test]
fn unpack_applies_directory_modes_last() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("dest");
    let read_only = Raw {
        kind: tar::EntryType::Directory,
        mode: 0o555,
        data: b"",
        ..file(b"ro/")
    };
    let stats = unpack(
        &payload(&[read_only, file(b"ro/inner")])[..],
        &dest,
        &UnpackLimits::default(),
    )
    .unwrap();
    assert_eq!(
        stats,
        UnpackStats {
            entries: 2,
            bytes: 6
        }
    );
    assert_eq!(
        fs::read_to_string(dest.join("ro/inner")).unwrap(),
        "pwned\n"
    );
    let mode = fs::metadata(dest.join("ro")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o555);
    // Let the temp dir clean up.
    fs::set_permissions(dest.join("ro"), Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn unpack_drops_group_and_world_write() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("dest");
    let open_dir = Raw {
        kind: tar::EntryType::Directory,
        mode: 0o777,
        data: b"",
        ..file(b"open/")
    };
    let open_file = Raw {
        mode: 0o666,
        ..file(b"open/file")
    };
    unpack(
        &payload(&[open_dir, open_file])[..],
        &dest,
        &UnpackLimits::default(),
    )
    .unwrap();
    let mode = |p: &str| fs::metadata(dest.join(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!((mode("open"), mode("open/file")), (0o755, 0o644));
}
