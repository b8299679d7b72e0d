//! Signed manifests as agents receive them: the first byte says how many
//! of the following bytes are the signature, the rest is the manifest.
//! Whatever they hold, parsing never panics and a signature made without
//! the key never verifies.
#![no_main]

use std::sync::OnceLock;

use baton_common::artifact::{PublicKey, SignedManifest, keygen, read_public_key};
use libfuzzer_sys::fuzz_target;

fn key() -> &'static PublicKey {
    static KEY: OnceLock<PublicKey> = OnceLock::new();
    KEY.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let (_, public) = keygen(&dir.path().join("k")).unwrap();
        read_public_key(&public).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&len, rest)) = data.split_first() else {
        return;
    };
    let (signature, manifest) = rest.split_at(usize::from(len).min(rest.len()));
    if let Ok(signed) = SignedManifest::parse(manifest.to_vec(), signature.to_vec()) {
        assert!(
            signed.verify(std::slice::from_ref(key())).is_err(),
            "a manifest verified against a key nobody outside this process has"
        );
        let _ = signed.manifest.check_fresh(std::time::SystemTime::now());
    }
});
