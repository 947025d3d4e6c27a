//! Users: register (one object or an array of up to 60), get and delete.
//!
//! Usernames are lower-cased on the way in, in bodies and in paths alike, as Easemob stores them.
//! A whole request is refused (400) when any entry is malformed; an array whose entries are
//! well-formed but partly taken answers 200 with the created users in `entities` and the taken
//! ones in `data`, as the current docs describe.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::{ApiError, EasemobError};
use super::state::{SandboxState, Timing, User};
use super::wire::{Envelope, UserEntity, json_body};

/// Most users one register request may carry.
pub const MAX_BATCH: usize = 60;
/// Longest username, in bytes.
pub const MAX_USERNAME_BYTES: usize = 64;
/// Longest nickname, in characters.
pub const MAX_NICKNAME_CHARS: usize = 100;

/// A user to register, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewUser {
    /// Lower-cased username.
    pub username: String,
    /// Display name.
    pub nickname: Option<String>,
}

/// Lower-cases a username and checks Easemob's rules: 1 to 64 bytes of `a-z 0-9 _ - .`.
pub fn normalize_username(raw: &str) -> Result<String, EasemobError> {
    let username = raw.to_ascii_lowercase();
    let legal = !username.is_empty()
        && username.len() <= MAX_USERNAME_BYTES
        && username.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b'.'));
    if legal { Ok(username) } else { Err(EasemobError::IllegalArgument(format!("username {raw} is not legal"))) }
}

/// Validates one entry of a register body.
pub fn parse_new_user(entry: &Value) -> Result<NewUser, EasemobError> {
    let Some(fields) = entry.as_object() else {
        return Err(EasemobError::IllegalArgument("each user must be a JSON object".into()));
    };
    let raw_username = fields
        .get("username")
        .and_then(Value::as_str)
        .ok_or_else(|| EasemobError::IllegalArgument("username must be provided".into()))?;
    let username = normalize_username(raw_username)?;
    let has_password = fields.get("password").and_then(Value::as_str).is_some_and(|p| !p.is_empty());
    if !has_password {
        return Err(EasemobError::IllegalArgument("password or pin must provided".into()));
    }
    let nickname = match fields.get("nickname") {
        None | Some(Value::Null) => None,
        Some(Value::String(nickname)) if nickname.chars().count() <= MAX_NICKNAME_CHARS => Some(nickname.clone()),
        Some(Value::String(_)) => {
            return Err(EasemobError::IllegalArgument("NICKNAME_TOO_LONG".into()));
        }
        Some(_) => {
            return Err(EasemobError::IllegalArgument("nickname must be a string".into()));
        }
    };
    Ok(NewUser { username, nickname })
}

/// The register body: one object, or an array of at most [`MAX_BATCH`]. The flag says which,
/// because the two answer duplicates differently.
pub fn parse_register_body(body: &Value) -> Result<(Vec<NewUser>, bool), EasemobError> {
    match body {
        Value::Object(_) => Ok((vec![parse_new_user(body)?], false)),
        Value::Array(entries) if entries.len() > MAX_BATCH => Err(EasemobError::IllegalArgument(format!(
            "Request body array size[{}] had almost reached or been greater than the upper range value[{MAX_BATCH}]",
            entries.len()
        ))),
        Value::Array(entries) => Ok((entries.iter().map(parse_new_user).collect::<Result<_, _>>()?, true)),
        _ => Err(EasemobError::IllegalArgument("request body must be a user object or an array of them".into())),
    }
}

/// `POST /{org}/{app}/users`.
pub async fn register_users(
    State(state): State<Arc<SandboxState>>,
    timing: Timing,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Envelope>, ApiError> {
    let request = json_body(&headers, &body).map_err(|e| state.reject(&timing, e))?;
    let (new_users, is_batch) = parse_register_body(&request).map_err(|e| state.reject(&timing, e))?;
    let now = state.clock().now_ms();
    let mut entities = Vec::new();
    let mut failures = Vec::new();
    {
        let mut world = state.world();
        if !is_batch && let Some(existing) = new_users.first().filter(|u| world.users.contains_key(&u.username)) {
            let error = EasemobError::DuplicateUsername {
                application: state.application().to_owned(),
                username: existing.username.clone(),
            };
            return Err(state.reject(&timing, error));
        }
        let mut seen = HashSet::new();
        for new_user in new_users {
            // A name repeated within one batch is "already exists" the second time, as it
            // would be if the entries were registered one after the other.
            if world.users.contains_key(&new_user.username) || !seen.insert(new_user.username.clone()) {
                failures.push(json!({
                    "username": new_user.username,
                    "registerUserFailReason": format!("the {} already exists", new_user.username),
                }));
                continue;
            }
            let user = User {
                uuid: SandboxState::new_uuid(&mut world),
                created: now,
                modified: now,
                nickname: new_user.nickname,
                friends: BTreeSet::new(),
            };
            entities.push(UserEntity::of(&new_user.username, &user));
            world.users.insert(new_user.username, user);
        }
    }
    Ok(Json(Envelope {
        action: "post",
        application: Some(state.application().to_owned()),
        path: Some("/users".into()),
        uri: format!("{}/users", state.app_url()),
        entities,
        data: is_batch.then_some(Value::Array(failures)),
        timestamp: now,
        duration: timing.elapsed_at(now),
        organization: Some(state.config().org.clone()),
        application_name: Some(state.config().app.clone()),
        count: None,
    }))
}

/// The `{username}` of `/{org}/{app}/users/{username}`.
#[derive(Debug, Deserialize)]
pub struct UserPath {
    username: String,
}

/// `GET /{org}/{app}/users/{username}`.
pub async fn get_user(
    State(state): State<Arc<SandboxState>>,
    timing: Timing,
    path: Result<Path<UserPath>, PathRejection>,
) -> Result<Json<Envelope>, ApiError> {
    let username = path_username(path).map_err(|e| state.reject(&timing, e))?;
    let entity = {
        let world = state.world();
        let user = world.users.get(&username).ok_or(EasemobError::ResourceNotFound);
        user.map(|user| UserEntity::of(&username, user)).map_err(|e| state.reject(&timing, e))?
    };
    Ok(Json(user_envelope(&state, &timing, "get", &username, entity, Some(1))))
}

/// `DELETE /{org}/{app}/users/{username}`: also removes the user from every friend list,
/// without roster callbacks (Easemob documents none for this).
pub async fn delete_user(
    State(state): State<Arc<SandboxState>>,
    timing: Timing,
    path: Result<Path<UserPath>, PathRejection>,
) -> Result<Json<Envelope>, ApiError> {
    let username = path_username(path).map_err(|e| state.reject(&timing, e))?;
    let entity = {
        let mut world = state.world();
        let user = world.users.remove(&username).ok_or(EasemobError::ResourceNotFound);
        let user = user.map_err(|e| state.reject(&timing, e))?;
        for friend in &user.friends {
            if let Some(friend) = world.users.get_mut(friend) {
                friend.friends.remove(&username);
            }
        }
        UserEntity::of(&username, &user)
    };
    Ok(Json(user_envelope(&state, &timing, "delete", &username, entity, None)))
}

fn path_username(path: Result<Path<UserPath>, PathRejection>) -> Result<String, EasemobError> {
    let Path(UserPath { username }) = path.map_err(|rejection| EasemobError::IllegalArgument(rejection.body_text()))?;
    Ok(username.to_ascii_lowercase())
}

fn user_envelope(
    state: &SandboxState,
    timing: &Timing,
    action: &'static str,
    username: &str,
    entity: UserEntity,
    count: Option<usize>,
) -> Envelope {
    let now = state.clock().now_ms();
    Envelope {
        action,
        application: Some(state.application().to_owned()),
        path: Some("/users".into()),
        uri: format!("{}/users/{username}", state.app_url()),
        entities: vec![entity],
        data: None,
        timestamp: now,
        duration: timing.elapsed_at(now),
        organization: Some(state.config().org.clone()),
        application_name: Some(state.config().app.clone()),
        count,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn usernames_are_lower_cased() {
        assert_eq!(normalize_username("Alice_01.x-y"), Ok("alice_01.x-y".to_owned()));
    }

    #[test]
    fn illegal_usernames_are_named_in_the_error() {
        for raw in ["", "a b", "zoë", "a/b", "a@b", &"a".repeat(65)] {
            assert_eq!(
                normalize_username(raw),
                Err(EasemobError::IllegalArgument(format!("username {raw} is not legal"))),
                "{raw:?}"
            );
        }
        assert!(normalize_username(&"a".repeat(64)).is_ok());
    }

    #[test]
    fn a_password_is_required_and_nicknames_are_bounded() {
        assert!(parse_new_user(&json!({"username": "a"})).is_err());
        assert!(parse_new_user(&json!({"username": "a", "password": ""})).is_err());
        let long = "n".repeat(101);
        assert!(parse_new_user(&json!({"username": "a", "password": "p", "nickname": long})).is_err());
        assert_eq!(
            parse_new_user(&json!({"username": "A", "password": "p", "nickname": "Ann"})),
            Ok(NewUser { username: "a".into(), nickname: Some("Ann".into()) })
        );
    }

    #[test]
    fn batches_are_bounded_at_sixty() {
        let entries: Vec<Value> = (0..61).map(|i| json!({"username": format!("u{i}"), "password": "p"})).collect();
        assert!(parse_register_body(&Value::Array(entries[..60].to_vec())).is_ok());
        let error = parse_register_body(&Value::Array(entries)).expect_err("61 is too many");
        assert!(matches!(error, EasemobError::IllegalArgument(text) if text.contains("size[61]")));
    }

    #[test]
    fn an_object_is_single_and_an_array_is_a_batch() {
        let one = json!({"username": "a", "password": "p"});
        assert_eq!(parse_register_body(&one).map(|(_, batch)| batch), Ok(false));
        assert_eq!(parse_register_body(&json!([one])).map(|(_, batch)| batch), Ok(true));
        assert!(parse_register_body(&json!("a")).is_err());
    }

    proptest! {
        #[test]
        fn every_accepted_username_is_lower_case_and_legal(raw in "\\PC{0,70}") {
            if let Ok(username) = normalize_username(&raw) {
                prop_assert!(!username.is_empty() && username.len() <= 64);
                prop_assert!(username.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-.".contains(&b)));
                prop_assert_eq!(username, raw.to_ascii_lowercase());
            }
        }
    }
}
