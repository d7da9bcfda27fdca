//! The database URL's TLS settings, read as libpq reads them.

use super::*;

fn parse(url: &str) -> PgUrl {
    PgUrl::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"))
}

#[test]
fn prefer_is_the_default_and_other_parameters_pass_through_untouched() {
    let u = parse("postgres://u:p%3Fw@db:5432/k");
    assert_eq!(u.mode, SslMode::Prefer);
    assert_eq!(u.root_cert, None);
    assert_eq!(u.url, "postgres://u:p%3Fw@db:5432/k");

    let u = parse("postgres://u@db/k?application_name=a%20b&sslmode=verify-full&connect_timeout=5");
    assert_eq!(u.mode, SslMode::VerifyFull);
    assert_eq!(
        u.url,
        "postgres://u@db/k?application_name=a%20b&connect_timeout=5"
    );
    // tokio-postgres accepts what is left.
    assert!(u.url.parse::<tokio_postgres::Config>().is_ok());
}

#[test]
fn every_sslmode_parses_and_the_last_one_wins() {
    for (text, mode) in [
        ("disable", SslMode::Disable),
        ("prefer", SslMode::Prefer),
        ("require", SslMode::Require),
        ("verify-ca", SslMode::VerifyCa),
        ("verify-full", SslMode::VerifyFull),
    ] {
        let u = parse(&format!("postgresql://h/d?sslmode={text}"));
        assert_eq!(u.mode, mode);
        assert_eq!(u.url, "postgresql://h/d");
    }
    assert_eq!(
        parse("postgres://h/d?sslmode=disable&sslmode=require").mode,
        SslMode::Require
    );
}

#[test]
fn unsupported_or_unknown_ssl_settings_are_refused_by_name() {
    for (url, needle) in [
        ("postgres://h/d?sslmode=allow", "sslmode=allow"),
        ("postgres://h/d?sslmode=verify_full", "verify_full"),
        ("postgres://h/d?sslcert=/c.pem", "sslcert"),
        ("postgres://h/d?sslkey=/k.pem", "sslkey"),
        ("postgres://h/d?sslrootcert=%zz", "percent"),
        ("postgres://h/d?sslrootcert=%+1", "percent"),
    ] {
        let err = PgUrl::parse(url).unwrap_err();
        assert!(err.contains(needle), "{url}: {err}");
    }
}

#[test]
fn sslrootcert_is_percent_decoded_and_system_means_verify_full() {
    let u = parse("postgres://h/d?sslrootcert=%2Fetc%2Fca%20dir%2Fca.pem&sslmode=verify-ca");
    assert_eq!(
        u.root_cert,
        Some(RootCert::File(PathBuf::from("/etc/ca dir/ca.pem")))
    );
    assert_eq!(u.mode, SslMode::VerifyCa);
    assert_eq!(u.url, "postgres://h/d");

    let u = parse("postgres://h/d?sslrootcert=system");
    assert_eq!(
        (u.mode, u.root_cert),
        (SslMode::VerifyFull, Some(RootCert::System))
    );
    let err = PgUrl::parse("postgres://h/d?sslrootcert=system&sslmode=require").unwrap_err();
    assert!(err.contains("verify-full"), "{err}");
    // An empty value is no value.
    assert_eq!(parse("postgres://h/d?sslrootcert=").root_cert, None);
}

fn policy_of(url: &str) -> Result<Policy, String> {
    parse(url).policy()
}

fn write_ca(dir: &Path) -> PathBuf {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let path = dir.join("ca.pem");
    std::fs::write(&path, params.self_signed(&key).unwrap().pem()).unwrap();
    path
}

#[test]
fn the_policy_follows_libpq() {
    let dir = std::env::temp_dir().join(format!("keyhold-pgtls-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = write_ca(&dir);
    let with_ca =
        |mode: &str| format!("postgres://h/d?sslmode={mode}&sslrootcert={}", ca.display());

    assert!(matches!(
        policy_of("postgres://h/d?sslmode=disable"),
        Ok(Policy::Plain)
    ));
    assert!(matches!(
        policy_of(&with_ca("prefer")),
        Ok(Policy::Tls {
            fallback_to_plaintext: true,
            ..
        })
    ));
    for mode in ["require", "verify-ca", "verify-full"] {
        assert!(matches!(
            policy_of(&with_ca(mode)),
            Ok(Policy::Tls {
                fallback_to_plaintext: false,
                ..
            })
        ));
    }
    // A named root file that is missing or not PEM is refused, whatever the mode.
    for mode in ["require", "verify-full"] {
        let missing = format!("postgres://h/d?sslmode={mode}&sslrootcert=/nonexistent/ca.pem");
        let err = policy_of(&missing).err().unwrap();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    }
    let junk = dir.join("junk.pem");
    std::fs::write(&junk, "no certificate here").unwrap();
    let err = policy_of(&format!(
        "postgres://h/d?sslmode=verify-ca&sslrootcert={}",
        junk.display()
    ))
    .err()
    .unwrap();
    assert!(err.contains("holds no certificate"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn verification_without_a_root_certificate_is_refused_at_once() {
    let target = PgUrl {
        url: "postgres://h/d".into(),
        mode: SslMode::VerifyFull,
        root_cert: None,
    };
    // libpq's default file, ~/.postgresql/root.crt, would be used if it existed.
    if default_root_cert_file().is_some_and(|p| p.is_file()) {
        eprintln!("note: ~/.postgresql/root.crt exists here; skipping the no-root check");
        return;
    }
    let err = target.policy().err().unwrap();
    assert!(err.contains("sslrootcert"), "{err}");
    assert!(matches!(
        parse("postgres://h/d?sslmode=require").policy(),
        Ok(Policy::Tls { .. })
    ));
}
