//! Key files on disk: the service KEK and the staff escrow key pair.
//!
//! Formats (one line of lower-case hex each, so they can be inspected and copied):
//!
//! - KEK file: `<version>:<64 hex>` — the KEK version and its 32 bytes;
//! - escrow public key file: the 1,216-byte X-Wing encapsulation key, 2,432 hex digits;
//! - escrow private key file: the 32-byte X-Wing seed, 64 hex digits, mode 0600.
//!
//! `keyhold serve` on a fresh machine generates a development KEK and escrow key pair in the
//! data directory, with a loud warning: a production deployment keeps the escrow private key
//! with staff tooling only and gives the service nothing but the public key.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::crypto::keys::{Kek, KekVersion};
use crate::crypto::xwing::{DecapsulationKey, EncapsulationKey};
use crate::crypto::CryptoError;

/// A key file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The file's content is not a key of the expected kind.
    #[error("{path}: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Generating a key failed.
    #[error("key generation failed: {0}")]
    Crypto(#[from] CryptoError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyFileError + '_ {
    move |source| KeyFileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn malformed(path: &Path, reason: impl Into<String>) -> KeyFileError {
    KeyFileError::Malformed {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Writes `contents` to a new file readable by its owner only (0600); refuses to overwrite.
pub fn write_secret_file(path: &Path, contents: &str) -> Result<(), KeyFileError> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    f.write_all(contents.as_bytes()).map_err(io(path))?;
    f.write_all(b"\n").map_err(io(path))
}

fn write_public_file(path: &Path, contents: &str) -> Result<(), KeyFileError> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(io(dir))?;
    }
    fs::write(path, format!("{contents}\n")).map_err(io(path))
}

fn read_hex(path: &Path) -> Result<Zeroizing<Vec<u8>>, KeyFileError> {
    let text = Zeroizing::new(fs::read_to_string(path).map_err(io(path))?);
    hex::decode(text.trim())
        .map(Zeroizing::new)
        .map_err(|e| malformed(path, format!("not hex: {e}")))
}

/// Reads a KEK file.
pub fn read_kek(path: &Path) -> Result<Kek, KeyFileError> {
    let text = Zeroizing::new(fs::read_to_string(path).map_err(io(path))?);
    let (version, key_hex) = text
        .trim()
        .split_once(':')
        .ok_or_else(|| malformed(path, "expected <version>:<64 hex digits>"))?;
    let version: u32 = version
        .parse()
        .map_err(|_| malformed(path, "the KEK version is not a number"))?;
    let key =
        Zeroizing::new(hex::decode(key_hex).map_err(|e| malformed(path, format!("not hex: {e}")))?);
    Kek::from_slice(KekVersion(version), &key).map_err(|e| malformed(path, e.to_string()))
}

/// Writes a new KEK file (0600).
pub fn write_kek(path: &Path, kek: &Kek) -> Result<(), KeyFileError> {
    let text = Zeroizing::new(format!(
        "{}:{}",
        kek.version().0,
        hex::encode(kek.expose_secret())
    ));
    write_secret_file(path, &text)
}

/// Reads an escrow public key file.
pub fn read_escrow_public_key(path: &Path) -> Result<EncapsulationKey, KeyFileError> {
    let bytes = read_hex(path)?;
    EncapsulationKey::from_slice(&bytes).map_err(|e| malformed(path, e.to_string()))
}

/// Reads an escrow private key file.
pub fn read_escrow_private_key(path: &Path) -> Result<DecapsulationKey, KeyFileError> {
    let bytes = read_hex(path)?;
    DecapsulationKey::from_slice(&bytes).map_err(|e| malformed(path, e.to_string()))
}

/// Generates an escrow key pair: the private key file (0600, refuses to overwrite) and the
/// public key file beside it. Returns the public key.
pub fn generate_escrow_key_pair(
    private_path: &Path,
    public_path: &Path,
) -> Result<EncapsulationKey, KeyFileError> {
    let key = DecapsulationKey::generate()?;
    let seed_hex = Zeroizing::new(hex::encode(key.expose_seed()));
    write_secret_file(private_path, &seed_hex)?;
    let public = key.encapsulation_key().clone();
    write_public_file(public_path, &hex::encode(public.to_bytes()))?;
    Ok(public)
}

/// The keys `serve` runs with.
pub struct ServiceKeys {
    /// The KEK.
    pub kek: Kek,
    /// The staff escrow public key.
    pub escrow_public_key: EncapsulationKey,
}

/// Loads the KEK and the escrow public key from the configured files, or, where a file is not
/// configured, from the data directory, generating development keys there on first start.
/// Returns the keys and the warnings to log.
pub fn load_or_generate(
    data_dir: &Path,
    kek_file: Option<&Path>,
    escrow_public_key_file: Option<&Path>,
) -> Result<(ServiceKeys, Vec<String>), KeyFileError> {
    let mut warnings = Vec::new();
    let kek = match kek_file {
        Some(path) => read_kek(path)?,
        None => {
            let path = data_dir.join("dev-kek.key");
            if !path.exists() {
                write_kek(&path, &Kek::generate(KekVersion(1))?)?;
                warnings.push(format!(
                    "DEVELOPMENT KEK generated at {}: for production, set KEYHOLD_KEK_FILE to a KEK kept apart from the database",
                    path.display()
                ));
            }
            read_kek(&path)?
        }
    };
    let escrow_public_key = match escrow_public_key_file {
        Some(path) => read_escrow_public_key(path)?,
        None => {
            let public = data_dir.join("dev-escrow.pub");
            let private = data_dir.join("dev-escrow.key");
            if !public.exists() {
                generate_escrow_key_pair(&private, &public)?;
                warnings.push(format!(
                    "DEVELOPMENT staff escrow key pair generated: private key {} sits beside the service. \
                     For production, run `keyhold escrow keygen` on staff tooling and set KEYHOLD_ESCROW_PUBLIC_KEY_FILE",
                    private.display()
                ));
            }
            read_escrow_public_key(&public)?
        }
    };
    Ok((
        ServiceKeys {
            kek,
            escrow_public_key,
        },
        warnings,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("keyhold-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn generated_files_round_trip_and_private_files_are_0600() {
        let dir = temp_dir("keyfiles");
        let (keys, warnings) = load_or_generate(&dir, None, None).unwrap();
        assert_eq!(warnings.len(), 2);
        let (again, warnings) = load_or_generate(&dir, None, None).unwrap();
        assert!(warnings.is_empty());
        assert_eq!(keys.kek.expose_secret(), again.kek.expose_secret());
        assert_eq!(keys.escrow_public_key, again.escrow_public_key);
        for f in ["dev-kek.key", "dev-escrow.key"] {
            let mode = fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{f}");
        }
        let private = read_escrow_private_key(&dir.join("dev-escrow.key")).unwrap();
        assert_eq!(private.encapsulation_key(), &keys.escrow_public_key);
        // Never overwrites a private key.
        assert!(generate_escrow_key_pair(&dir.join("dev-escrow.key"), &dir.join("x.pub")).is_err());
        fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn malformed_files_name_the_file() {
        let dir = temp_dir("badkey");
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("kek");
        fs::write(&path, "1:abcd").unwrap();
        let err = read_kek(&path).unwrap_err().to_string();
        assert!(err.contains("kek"), "{err}");
        fs::remove_dir_all(dir).ok();
    }
}
