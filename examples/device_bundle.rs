//! A device's side of Keyhold, for trying the API with `grpcurl` (see the README's
//! walkthrough). It uses the crate's crypto core only: the private keys stay in local files and
//! never go to the service.
//!
//! ```text
//! cargo run --example device_bundle -- new <user> <device> [<dir>]
//! ```
//! draws the device's X-Wing and Ed25519 identity key pairs, saves their 32-byte seeds in
//! `<dir>/<user>.<device>.xwing.key` and `<dir>/<user>.<device>.identity.key` (hex, mode 0600;
//! `<dir>` defaults to the working directory) and prints the signed
//! `keyhold.v1.KeyDirectory/PublishDeviceKey` request as JSON for `grpcurl -d @`.
//!
//! ```text
//! cargo run --example device_bundle -- open <session-keys.json | -> [<dir>]
//! ```
//! reads what `grpcurl` printed for `keyhold.v1.Sessions/GetSessionKeys` (a file, or `-` for
//! standard input), opens each envelope with the saved X-Wing key of the device it is addressed
//! to, and prints `session <id> epoch <n> dek <hex>` per envelope.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use keyhold::crypto::envelope::{open_dek, DekEnvelope, Recipient, WrapContext};
use keyhold::crypto::ids::{DeviceId, Epoch, SessionId, UserId};
use keyhold::crypto::sign::{DeviceKeyBundle, IdentityKeyPair};
use keyhold::crypto::xwing::DecapsulationKey;
use keyhold::crypto::Suite;
use keyhold::keyfiles::write_secret_file;
use zeroize::Zeroizing;

type Result<T> = std::result::Result<T, Box<dyn Error>>;

const USAGE: &str = "usage:
  device_bundle new <user> <device> [<dir>]      keys to <dir>, PublishDeviceKey JSON to stdout
  device_bundle open <session-keys.json|-> [<dir>]  open GetSessionKeys output, print DEKs";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["new", user, device] => new_device(user, device, Path::new(".")),
        ["new", user, device, dir] => new_device(user, device, Path::new(dir)),
        ["open", json] => open(json, Path::new(".")),
        ["open", json, dir] => open(json, Path::new(dir)),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("device_bundle: {e}");
            ExitCode::FAILURE
        }
    }
}

fn key_path(dir: &Path, user: &UserId, device: &DeviceId, kind: &str) -> PathBuf {
    dir.join(format!("{user}.{device}.{kind}.key"))
}

/// `new`: key pairs to files, the signed bundle as a PublishDeviceKey request to stdout.
fn new_device(user: &str, device: &str, dir: &Path) -> Result<()> {
    let user = UserId::new(user)?;
    let device = DeviceId::new(device)?;
    let xwing = DecapsulationKey::generate()?;
    let identity = IdentityKeyPair::generate()?;
    let xwing_path = key_path(dir, &user, &device, "xwing");
    let identity_path = key_path(dir, &user, &device, "identity");
    write_secret_file(
        &xwing_path,
        &Zeroizing::new(hex::encode(xwing.expose_seed())),
    )?;
    write_secret_file(
        &identity_path,
        &Zeroizing::new(hex::encode(identity.expose_seed())),
    )?;

    let bundle = DeviceKeyBundle {
        suite: Suite::XWingAes256GcmV1,
        user: user.clone(),
        device: device.clone(),
        identity_key: identity.public_key(),
        encapsulation_key: xwing.encapsulation_key().clone(),
    };
    let signature = identity.sign(&bundle);
    // Field names and encodings as protobuf's JSON mapping has them: bytes are base64.
    let request = serde_json::json!({
        "userId": user.as_str(),
        "deviceId": device.as_str(),
        "suite": "SUITE_XWING_AES256GCM_V1",
        "encapsulationKey": base64_encode(&xwing.encapsulation_key().to_bytes()),
        "identityKey": base64_encode(identity.public_key().as_bytes()),
        "signature": base64_encode(signature.as_bytes()),
    });
    println!("{}", serde_json::to_string_pretty(&request)?);
    eprintln!(
        "device {user}/{device}: key id {}; private keys in {} and {}",
        xwing.encapsulation_key().key_id(),
        xwing_path.display(),
        identity_path.display()
    );
    Ok(())
}

/// `open`: opens every envelope of a GetSessionKeys response with the matching saved key.
fn open(json: &str, dir: &Path) -> Result<()> {
    let text = if json == "-" {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(json).map_err(|e| format!("{json}: {e}"))?
    };
    let response: serde_json::Value = serde_json::from_str(&text)?;
    let keys = response["sessionKeys"].as_array().ok_or(
        "no sessionKeys in the input: expected grpcurl's output of Sessions/GetSessionKeys",
    )?;
    if keys.is_empty() {
        return Err("sessionKeys is empty: nothing is addressed to this device".into());
    }
    for key in keys {
        let field = |name: &str| {
            key[name]
                .as_str()
                .ok_or_else(|| format!("sessionKeys[].{name} is missing"))
        };
        let user = UserId::new(field("userId")?)?;
        let device = DeviceId::new(field("deviceId")?)?;
        let session_id = SessionId::parse(field("sessionId")?)?;
        let epoch = Epoch::new(json_u32(&key["epoch"]).ok_or("sessionKeys[].epoch is missing")?)?;
        let path = key_path(dir, &user, &device, "xwing");
        let seed = Zeroizing::new(
            hex::decode(
                std::fs::read_to_string(&path)
                    .map_err(|e| format!("{}: {e}", path.display()))?
                    .trim(),
            )
            .map_err(|e| format!("{}: {e}", path.display()))?,
        );
        let xwing = DecapsulationKey::from_slice(&seed)?;
        let key_id = base64_decode(field("keyId")?)?;
        if key_id != xwing.encapsulation_key().key_id().as_bytes() {
            return Err(format!(
                "the envelope is for key {}, not the key in {}",
                hex::encode(key_id),
                path.display()
            )
            .into());
        }
        let envelope = DekEnvelope::from_bytes(&base64_decode(field("envelope")?)?)?;
        let context = WrapContext {
            session_id,
            epoch,
            recipient: Recipient::Device { user, device },
        };
        let dek = open_dek(&envelope, &xwing, &context)?;
        println!(
            "session {session_id} epoch {epoch} dek {}",
            hex::encode(dek.expose_secret())
        );
    }
    Ok(())
}

/// A `uint32` field of protobuf's JSON mapping, which a writer may give as a number (`1`) or
/// as a decimal string (`"1"`); both are valid proto3 JSON.
fn json_u32(value: &serde_json::Value) -> Option<u32> {
    match value {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    }
    .and_then(|n| u32::try_from(n).ok())
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding, as protobuf's JSON mapping writes bytes.
fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes base64 in either alphabet (protobuf's JSON mapping accepts both), padded or not.
fn base64_decode(text: &str) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return Err(format!("not base64: {text:?}").into()),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uint32_fields_read_as_numbers_or_strings() {
        for (json, want) in [
            ("1", Some(1)),
            ("\"1\"", Some(1)),
            ("\"4294967295\"", Some(u32::MAX)),
            ("4294967296", None),
            ("\"x\"", None),
            ("null", None),
            ("-1", None),
        ] {
            let value: serde_json::Value = serde_json::from_str(json).unwrap();
            assert_eq!(json_u32(&value), want, "{json}");
        }
    }

    #[test]
    fn bytes_read_in_either_base64_alphabet_padded_or_not() {
        let bytes = [0xfb, 0xff, 0x01, 0x02];
        let standard = base64_encode(&bytes);
        assert_eq!(standard, "+/8BAg==");
        for text in ["+/8BAg==", "+/8BAg", "-_8BAg==", "-_8BAg"] {
            assert_eq!(base64_decode(text).unwrap(), bytes, "{text}");
        }
        assert!(base64_decode("a b").is_err());
    }
}
