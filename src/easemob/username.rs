//! Easemob's user-ID rules, checked before a name is put into a URL or a request.

/// Longest user ID Easemob accepts, in bytes.
pub const MAX_USERNAME_BYTES: usize = 64;

/// Checks a user ID against Easemob's rules: 1 to 64 bytes of `a-z 0-9 _ - .`.
///
/// Upper-case ASCII letters are accepted because Easemob lower-cases user IDs (`Aa` and `aa`
/// are the same user). `.` and `..` are refused although their characters are legal: as a URL
/// path segment they mean "this directory" and "the parent directory", so no request could
/// address such a user. The `Err` says what is wrong, in words fit for an API answer.
pub fn validate_username(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("username is empty; it needs 1 to 64 characters of a-z 0-9 _ - .".into());
    }
    if name.len() > MAX_USERNAME_BYTES {
        return Err(format!("username is {} bytes long; Easemob allows at most {MAX_USERNAME_BYTES}", name.len()));
    }
    if let Some(bad) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))) {
        return Err(format!("username {name:?} contains {bad:?}; only a-z 0-9 _ - . are allowed"));
    }
    if name == "." || name == ".." {
        return Err(format!("username {name:?} cannot be used: it is a relative path segment in a URL"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ordinary_names_are_valid() {
        for name in ["alice", "user_1", "a-b.c", "0", "Alice", "a..b", ".hidden"] {
            assert_eq!(validate_username(name), Ok(()), "{name}");
        }
        assert_eq!(validate_username(&"x".repeat(64)), Ok(()));
    }

    #[test]
    fn empty_name_is_refused() {
        let err = validate_username("").expect_err("empty");
        assert!(err.contains("empty"), "{err}");
    }

    #[test]
    fn name_over_64_bytes_is_refused() {
        let err = validate_username(&"x".repeat(65)).expect_err("too long");
        assert!(err.contains("65 bytes"), "{err}");
    }

    #[test]
    fn forbidden_characters_are_named() {
        for (name, bad) in [("a b", "' '"), ("a/b", "'/'"), ("a#b", "'#'"), ("a@b", "'@'"), ("名字", "'名'")] {
            let err = validate_username(name).expect_err(name);
            assert!(err.contains(bad), "{name}: {err}");
        }
    }

    #[test]
    fn dot_segments_are_refused() {
        assert!(validate_username(".").is_err());
        assert!(validate_username("..").is_err());
    }

    proptest! {
        #[test]
        fn names_from_the_allowed_alphabet_are_valid(name in "[a-zA-Z0-9_.-]{1,64}") {
            prop_assume!(name != "." && name != "..");
            prop_assert_eq!(validate_username(&name), Ok(()));
        }

        #[test]
        fn valid_names_are_safe_url_segments(name in "\\PC{0,80}") {
            if validate_username(&name).is_ok() {
                prop_assert!(name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b)));
                prop_assert!(!name.is_empty() && name.len() <= 64);
            }
        }
    }
}
