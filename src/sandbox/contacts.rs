//! Friends: add and remove (always both directions at once) and list.
//!
//! Choices where Easemob's docs are silent:
//! - Re-adding an existing friend answers 200 with the usual body, counts nothing twice and sends
//!   no callback, because nothing changed. Removing someone who is not a friend is the same.
//! - Adding yourself is 400 `illegal_argument`.
//! - The friend limit is checked for both users (Easemob has separate client error codes for the
//!   inviter and the invitee being full), only when the friendship is new.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use serde::Deserialize;
use serde_json::Value;

use super::callbacks::{RosterEvent, RosterOperation, roster_ver};
use super::error::{ApiError, EasemobError};
use super::state::{SandboxState, Timing, World};
use super::wire::{Envelope, UserEntity};

/// `{owner}` and `{friend}` of `/{org}/{app}/users/{owner}/contacts/users/{friend}` (the route
/// calls the owner `{username}`, because the router needs one name per path position).
#[derive(Debug, Deserialize)]
pub struct FriendPath {
    #[serde(rename = "username")]
    owner: String,
    friend: String,
}

/// `{owner}` of `/{org}/{app}/users/{owner}/contacts/users`.
#[derive(Debug, Deserialize)]
pub struct OwnerPath {
    #[serde(rename = "username")]
    owner: String,
}

/// `POST /{org}/{app}/users/{owner}/contacts/users/{friend}`.
pub async fn add_friend(
    State(state): State<Arc<SandboxState>>,
    timing: Timing,
    path: Result<Path<FriendPath>, PathRejection>,
) -> Result<Json<Envelope>, ApiError> {
    change_friendship(&state, &timing, path, RosterOperation::Add)
}

/// `DELETE /{org}/{app}/users/{owner}/contacts/users/{friend}`.
pub async fn remove_friend(
    State(state): State<Arc<SandboxState>>,
    timing: Timing,
    path: Result<Path<FriendPath>, PathRejection>,
) -> Result<Json<Envelope>, ApiError> {
    change_friendship(&state, &timing, path, RosterOperation::Remove)
}

fn change_friendship(
    state: &Arc<SandboxState>,
    timing: &Timing,
    path: Result<Path<FriendPath>, PathRejection>,
    operation: RosterOperation,
) -> Result<Json<Envelope>, ApiError> {
    let Path(FriendPath { owner, friend }) =
        path.map_err(|rejection| state.reject(timing, EasemobError::IllegalArgument(rejection.body_text())))?;
    let (owner, friend) = (owner.to_ascii_lowercase(), friend.to_ascii_lowercase());
    let (owner_uuid, friend_entity, deliveries) = {
        let mut world = state.world();
        let events = apply_change(
            &mut world,
            &owner,
            &friend,
            operation,
            state.config().friend_limit,
            state.config().callbacks_per_add,
        )
        .map_err(|e| state.reject(timing, e))?;
        let owner_uuid = world.users.get(&owner).map(|u| u.uuid.clone()).unwrap_or_default();
        let friend_entity = world.users.get(&friend).map(|u| UserEntity::of(&friend, u));
        let deliveries = state.plan_callbacks(&mut world, events);
        (owner_uuid, friend_entity, deliveries)
    };
    state.start_deliveries(deliveries);
    let now = state.clock().now_ms();
    let path = format!("/users/{owner_uuid}/contacts");
    Ok(Json(Envelope {
        action: match operation {
            RosterOperation::Add => "post",
            RosterOperation::Remove => "delete",
        },
        application: Some(state.application().to_owned()),
        uri: format!("{}{path}", state.app_url()),
        path: Some(path),
        entities: friend_entity.into_iter().collect(),
        data: None,
        timestamp: now,
        duration: timing.elapsed_at(now),
        organization: Some(state.config().org.clone()),
        application_name: Some(state.config().app.clone()),
        count: None,
    }))
}

/// Adds or removes the friendship in both directions and returns the roster events to report:
/// none when nothing changed; for an add, owner -> friend, plus friend -> owner when
/// `callbacks_per_add` is 2; for a remove, owner -> friend.
pub fn apply_change(
    world: &mut World,
    owner: &str,
    friend: &str,
    operation: RosterOperation,
    friend_limit: usize,
    callbacks_per_add: u8,
) -> Result<Vec<RosterEvent>, EasemobError> {
    let owner_friends = world.users.get(owner).map(|u| u.friends.len()).ok_or(EasemobError::ResourceNotFound)?;
    let friend_friends = world.users.get(friend).map(|u| u.friends.len()).ok_or(EasemobError::ResourceNotFound)?;
    if owner == friend {
        return Err(EasemobError::IllegalArgument("a user cannot be their own friend".into()));
    }
    let already_friends = world.users.get(owner).is_some_and(|u| u.friends.contains(friend));
    match operation {
        RosterOperation::Add if already_friends => Ok(Vec::new()),
        RosterOperation::Add => {
            if owner_friends >= friend_limit || friend_friends >= friend_limit {
                return Err(EasemobError::ExceedLimit);
            }
            link(world, owner, friend, true);
            let mut events = vec![event(world, owner, friend, RosterOperation::Add)];
            if callbacks_per_add >= 2 {
                events.push(event(world, friend, owner, RosterOperation::Add));
            }
            Ok(events)
        }
        RosterOperation::Remove if !already_friends => Ok(Vec::new()),
        RosterOperation::Remove => {
            link(world, owner, friend, false);
            Ok(vec![event(world, owner, friend, RosterOperation::Remove)])
        }
    }
}

/// Makes or breaks the friendship on both sides.
fn link(world: &mut World, a: &str, b: &str, friends: bool) {
    for (me, other) in [(a, b), (b, a)] {
        if let Some(user) = world.users.get_mut(me) {
            if friends {
                user.friends.insert(other.to_owned());
            } else {
                user.friends.remove(other);
            }
        }
    }
}

fn event(world: &World, from: &str, to: &str, operation: RosterOperation) -> RosterEvent {
    let to_friends = world.users.get(to).map(|u| u.friends.iter().map(String::as_str).collect::<Vec<_>>());
    RosterEvent {
        from: from.to_owned(),
        to: to.to_owned(),
        operation,
        roster_ver: roster_ver(to, to_friends.unwrap_or_default()),
    }
}

/// `GET /{org}/{app}/users/{owner}/contacts/users`: usernames in `data`, sorted.
pub async fn list_friends(
    State(state): State<Arc<SandboxState>>,
    timing: Timing,
    path: Result<Path<OwnerPath>, PathRejection>,
) -> Result<Json<Envelope>, ApiError> {
    let Path(OwnerPath { owner }) =
        path.map_err(|rejection| state.reject(&timing, EasemobError::IllegalArgument(rejection.body_text())))?;
    let owner = owner.to_ascii_lowercase();
    let friends: Vec<Value> = {
        let world = state.world();
        let user = world.users.get(&owner).ok_or(EasemobError::ResourceNotFound);
        let user = user.map_err(|e| state.reject(&timing, e))?;
        user.friends.iter().cloned().map(Value::String).collect()
    };
    let now = state.clock().now_ms();
    Ok(Json(Envelope {
        action: "get",
        application: None,
        path: None,
        uri: format!("{}/users/{owner}/contacts/users", state.app_url()),
        entities: Vec::new(),
        count: Some(friends.len()),
        data: Some(Value::Array(friends)),
        timestamp: now,
        duration: timing.elapsed_at(now),
        organization: None,
        application_name: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::state::User;

    fn world_with(names: &[&str]) -> World {
        let mut world = World::new(0);
        for name in names {
            let user = User {
                uuid: format!("uuid-{name}"),
                created: 0,
                modified: 0,
                nickname: None,
                friends: Default::default(),
            };
            world.users.insert((*name).to_owned(), user);
        }
        world
    }

    fn friends_of(world: &World, name: &str) -> Vec<String> {
        world.users[name].friends.iter().cloned().collect()
    }

    #[test]
    fn adding_is_two_way_and_reports_owner_to_friend() {
        let mut world = world_with(&["alice", "bob"]);
        let events = apply_change(&mut world, "alice", "bob", RosterOperation::Add, 100, 1).expect("added");
        assert_eq!(friends_of(&world, "alice"), ["bob"]);
        assert_eq!(friends_of(&world, "bob"), ["alice"]);
        assert_eq!(events.len(), 1);
        assert_eq!((events[0].from.as_str(), events[0].to.as_str()), ("alice", "bob"));
    }

    #[test]
    fn two_callbacks_per_add_also_report_friend_to_owner() {
        let mut world = world_with(&["alice", "bob"]);
        let events = apply_change(&mut world, "alice", "bob", RosterOperation::Add, 100, 2).expect("added");
        let pairs: Vec<(&str, &str)> = events.iter().map(|e| (e.from.as_str(), e.to.as_str())).collect();
        assert_eq!(pairs, [("alice", "bob"), ("bob", "alice")]);
    }

    #[test]
    fn re_adding_and_removing_a_stranger_change_nothing_and_report_nothing() {
        let mut world = world_with(&["alice", "bob"]);
        apply_change(&mut world, "alice", "bob", RosterOperation::Add, 1, 1).expect("added");
        let again =
            apply_change(&mut world, "bob", "alice", RosterOperation::Add, 1, 1).expect("re-add at the limit is fine");
        assert!(again.is_empty());
        apply_change(&mut world, "alice", "bob", RosterOperation::Remove, 1, 1).expect("removed");
        assert!(friends_of(&world, "bob").is_empty());
        let again = apply_change(&mut world, "alice", "bob", RosterOperation::Remove, 1, 1).expect("no-op");
        assert!(again.is_empty());
    }

    #[test]
    fn the_limit_applies_to_either_side() {
        let mut world = world_with(&["alice", "bob", "carol"]);
        apply_change(&mut world, "alice", "bob", RosterOperation::Add, 1, 1).expect("added");
        assert_eq!(
            apply_change(&mut world, "carol", "alice", RosterOperation::Add, 1, 1),
            Err(EasemobError::ExceedLimit)
        );
        assert_eq!(
            apply_change(&mut world, "alice", "carol", RosterOperation::Add, 1, 1),
            Err(EasemobError::ExceedLimit)
        );
        assert!(friends_of(&world, "carol").is_empty());
    }

    #[test]
    fn unknown_users_and_yourself_are_refused() {
        let mut world = world_with(&["alice"]);
        assert_eq!(
            apply_change(&mut world, "alice", "nobody", RosterOperation::Add, 9, 1),
            Err(EasemobError::ResourceNotFound)
        );
        assert_eq!(
            apply_change(&mut world, "nobody", "alice", RosterOperation::Remove, 9, 1),
            Err(EasemobError::ResourceNotFound)
        );
        assert!(matches!(
            apply_change(&mut world, "alice", "alice", RosterOperation::Add, 9, 1),
            Err(EasemobError::IllegalArgument(_))
        ));
    }

    #[test]
    fn a_remove_carries_the_version_of_the_receivers_new_list() {
        let mut world = world_with(&["alice", "bob"]);
        apply_change(&mut world, "alice", "bob", RosterOperation::Add, 9, 1).expect("added");
        let events = apply_change(&mut world, "alice", "bob", RosterOperation::Remove, 9, 1).expect("removed");
        assert_eq!(events[0].roster_ver, roster_ver("bob", []));
    }
}
