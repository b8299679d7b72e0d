//! Dashboard sign-in tokens (`baton dashboard token --role operator`):
//! random secrets stored by their SHA-256 (`dashboard-tokens/<hex>`),
//! never in clear, each with a role, who asked for it and when it expires.
//! The browser keeps the token in an HttpOnly cookie and presents it with
//! every request; nothing else signs in.

use std::time::{Duration, SystemTime};

use baton_common::time::{from_unix_millis, unix_millis};
use baton_common::tls::Role;
use serde::{Deserialize, Serialize};

use crate::store::{Op, Store, StoreError, Txn};

/// How long a token signs in when the request does not say.
pub const DEFAULT_TTL: Duration = Duration::from_secs(12 * 3600);
/// The longest a token may sign in.
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// What every token starts with (so a leaked one is recognisable).
pub const PREFIX: &str = "btd1-";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    role: String,
    /// Who asked for it, e.g. `operator alice`.
    who: String,
    /// Unix milliseconds.
    expires: u64,
}

/// A signed-in dashboard user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// What the token allows.
    pub role: Role,
    /// Who the token was made for.
    pub who: String,
    /// When it stops working.
    pub expires: SystemTime,
}

fn key(token: &str) -> String {
    format!(
        "dashboard-tokens/{}",
        baton_common::secret::stored_id(token)
    )
}

/// Makes and stores a token for `role`, on behalf of `who`.
pub async fn create(
    store: &dyn Store,
    role: Role,
    who: &str,
    ttl: Duration,
) -> Result<(String, SystemTime), StoreError> {
    let token = baton_common::secret::new_token(PREFIX).map_err(|e| StoreError::Backend {
        op: "dashboard token",
        reason: e.to_string(),
    })?;
    let now = SystemTime::now();
    let expires = baton_common::time::later(now, ttl);
    // Expired tokens are forgotten as new ones are made.
    let mut ops = Vec::new();
    for (k, v) in store.list("dashboard-tokens/").await? {
        let expired = serde_json::from_slice::<Record>(&v)
            .map_or(true, |r| from_unix_millis(r.expires) <= now);
        if expired {
            ops.push(Op::Delete(k));
        }
    }
    let record = Record {
        role: role.as_str().to_owned(),
        who: who.to_owned(),
        expires: unix_millis(expires),
    };
    let value = serde_json::to_vec(&record).map_err(|e| StoreError::Corrupt {
        key: key(&token),
        reason: e.to_string(),
    })?;
    ops.push(Op::Put(key(&token), value));
    store
        .txn(Txn {
            compares: vec![],
            ops,
        })
        .await?;
    Ok((token, expires))
}

/// Makes a token stop working (signing out).
pub async fn revoke(store: &dyn Store, token: &str) -> Result<(), StoreError> {
    store
        .txn(Txn {
            compares: vec![],
            ops: vec![Op::Delete(key(token))],
        })
        .await
        .map(drop)
}

/// The session a token signs in, if it is known and unexpired.
pub async fn check(store: &dyn Store, token: &str) -> Result<Option<Session>, StoreError> {
    if !token.starts_with(PREFIX) || token.len() > 128 {
        return Ok(None);
    }
    let Some(bytes) = store.get(&key(token)).await? else {
        return Ok(None);
    };
    let Ok(record) = serde_json::from_slice::<Record>(&bytes) else {
        return Ok(None);
    };
    let expires = from_unix_millis(record.expires);
    let Ok(role) = record.role.parse::<Role>() else {
        return Ok(None);
    };
    if expires <= SystemTime::now() {
        return Ok(None);
    }
    Ok(Some(Session {
        role,
        who: record.who,
        expires,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_token_signs_in_until_it_expires_and_only_itself() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::RedbStore::open(&dir.path().join("s.redb")).unwrap();
        let (token, _) = create(&store, Role::Operator, "operator alice", DEFAULT_TTL)
            .await
            .unwrap();
        assert!(token.starts_with(PREFIX));
        let s = check(&store, &token).await.unwrap().unwrap();
        assert_eq!((s.role, s.who.as_str()), (Role::Operator, "operator alice"));
        // Nothing in clear in the store.
        for (k, v) in store.list("dashboard-tokens/").await.unwrap() {
            assert!(!k.contains(&token[PREFIX.len()..]));
            assert!(!String::from_utf8_lossy(&v).contains(&token[PREFIX.len()..]));
        }
        let mut wrong = token.clone();
        wrong.pop();
        wrong.push('x');
        assert_eq!(check(&store, &wrong).await.unwrap(), None);
        assert_eq!(check(&store, "").await.unwrap(), None);
        let (old, _) = create(&store, Role::Admin, "x", Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(check(&store, &old).await.unwrap(), None);
        // The expired one is forgotten when the next is made; a revoked
        // one stops working.
        let (newer, _) = create(&store, Role::Viewer, "y", DEFAULT_TTL)
            .await
            .unwrap();
        assert_eq!(store.list("dashboard-tokens/").await.unwrap().len(), 2);
        revoke(&store, &newer).await.unwrap();
        assert_eq!(check(&store, &newer).await.unwrap(), None);
        assert!(check(&store, &token).await.unwrap().is_some());
    }
}
