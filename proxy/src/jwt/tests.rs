use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::json;

use super::*;

const ISS: &str = "https://issuer.example";

/// An ES256 key: what signs, and its public JWK.
struct EcKey {
    signing: EncodingKey,
    jwk: Value,
}

fn ec_key(kid: &str) -> EcKey {
    let kp = rcgen::KeyPair::generate().unwrap();
    let raw = kp.public_key_raw();
    assert_eq!(raw.len(), 65, "uncompressed P-256 point");
    EcKey {
        signing: EncodingKey::from_ec_der(&kp.serialize_der()),
        jwk: json!({
            "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256",
            "x": URL_SAFE_NO_PAD.encode(&raw[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&raw[33..]),
        }),
    }
}

fn rsa_signing() -> EncodingKey {
    let pem = include_str!("testdata/rsa-test-key.pem");
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    EncodingKey::from_rsa_der(&STANDARD.decode(b64).unwrap())
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(key: &EncodingKey, alg: Algorithm, kid: &str, claims: Value) -> String {
    let mut h = Header::new(alg);
    h.kid = Some(kid.into());
    encode(&h, &claims, key).unwrap()
}

fn claims(sub: &str) -> Value {
    json!({"iss": ISS, "sub": sub, "aud": ["bookinfo"], "exp": now() + 600, "groups": ["admins"]})
}

fn authn(rule_yaml: &str) -> Authn {
    let rules: Vec<JwtRule> = serde_yaml::from_str(rule_yaml).unwrap();
    Authn::new(&rules, &crate::cluster::Registry::default()).unwrap()
}

fn inline_rule(jwks: &Value, extra: &str) -> String {
    format!(
        "- issuer: {ISS}\n  audiences: [bookinfo]\n  jwks: '{}'\n{extra}",
        jwks
    )
}

async fn check(a: &Authn, bearer: &str) -> (Result<Option<Claims>, Rejected>, HeaderMap) {
    let mut h = HeaderMap::new();
    h.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {bearer}")).unwrap(),
    );
    let r = a.authenticate(&mut h, None).await;
    (r, h)
}

#[tokio::test]
async fn valid_tokens_pass_and_bad_ones_are_rejected() {
    let ec = ec_key("ec-1");
    let rsa_jwks: Value = serde_json::from_str(include_str!("testdata/rsa-jwks.json")).unwrap();
    let mut keys = rsa_jwks["keys"].as_array().unwrap().clone();
    keys.push(ec.jwk.clone());
    let jwks = json!({ "keys": keys });
    let a = authn(&inline_rule(&jwks, ""));
    let rsa = rsa_signing();

    // Valid, ES256 and RS256.
    let (r, h) = check(
        &a,
        &token(&ec.signing, Algorithm::ES256, "ec-1", claims("alice")),
    )
    .await;
    let c = r.unwrap().unwrap();
    assert_eq!(c.principal, format!("{ISS}/alice"));
    assert!(
        h.get(http::header::AUTHORIZATION).is_none(),
        "not forwarded by default"
    );
    let (r, _) = check(&a, &token(&rsa, Algorithm::RS256, "rsa-1", claims("bob"))).await;
    assert_eq!(r.unwrap().unwrap().principal, format!("{ISS}/bob"));

    // Expired.
    let mut expired = claims("alice");
    expired["exp"] = json!(now() - 3600);
    let (r, _) = check(&a, &token(&ec.signing, Algorithm::ES256, "ec-1", expired)).await;
    assert_eq!(r, Err(Rejected::Invalid));

    // Not yet valid.
    let mut early = claims("alice");
    early["nbf"] = json!(now() + 3600);
    let (r, _) = check(&a, &token(&ec.signing, Algorithm::ES256, "ec-1", early)).await;
    assert_eq!(r, Err(Rejected::Invalid));

    // Wrong issuer.
    let mut other = claims("alice");
    other["iss"] = json!("https://evil.example");
    let (r, _) = check(&a, &token(&ec.signing, Algorithm::ES256, "ec-1", other)).await;
    assert_eq!(r, Err(Rejected::UnknownIssuer));

    // Wrong audience.
    let mut aud = claims("alice");
    aud["aud"] = json!("someone-else");
    let (r, _) = check(&a, &token(&ec.signing, Algorithm::ES256, "ec-1", aud)).await;
    assert_eq!(r, Err(Rejected::Invalid));

    // Signed by a key not in the set.
    let stranger = ec_key("ec-1");
    let (r, _) = check(
        &a,
        &token(&stranger.signing, Algorithm::ES256, "ec-1", claims("alice")),
    )
    .await;
    assert_eq!(r, Err(Rejected::Invalid));

    // Tampered: the payload changed after signing.
    let good = token(&ec.signing, Algorithm::ES256, "ec-1", claims("alice"));
    let parts: Vec<&str> = good.split('.').collect();
    let forged_payload = URL_SAFE_NO_PAD.encode(claims("root").to_string());
    let tampered = format!("{}.{forged_payload}.{}", parts[0], parts[2]);
    let (r, _) = check(&a, &tampered).await;
    assert_eq!(r, Err(Rejected::Invalid));

    // alg: none, unsigned.
    let none_header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
    let unsigned = format!(
        "{none_header}.{}.",
        URL_SAFE_NO_PAD.encode(claims("alice").to_string())
    );
    let (r, _) = check(&a, &unsigned).await;
    assert_eq!(r, Err(Rejected::Invalid));

    // Algorithm confusion: HS256 "signed" with the RSA public modulus.
    let n = rsa_jwks["keys"][0]["n"].as_str().unwrap();
    let hs = token(
        &EncodingKey::from_secret(n.as_bytes()),
        Algorithm::HS256,
        "rsa-1",
        claims("alice"),
    );
    let (r, _) = check(&a, &hs).await;
    assert_eq!(r, Err(Rejected::Invalid));

    // Garbage.
    let (r, _) = check(&a, "not-a-jwt").await;
    assert_eq!(r, Err(Rejected::Invalid));

    // No token: passes, unauthenticated.
    let mut h = HeaderMap::new();
    assert_eq!(a.authenticate(&mut h, None).await, Ok(None));
}

#[tokio::test]
async fn locations_and_outputs_follow_the_rule() {
    let ec = ec_key("k");
    let jwks = json!({ "keys": [ec.jwk] });
    let a = authn(&inline_rule(
        &jwks,
        "  fromHeaders: [{name: x-jwt, prefix: 'Token '}]\n  fromParams: [jwt]\n  forwardOriginalToken: true\n  outputPayloadToHeader: x-jwt-payload\n  outputClaimToHeaders: [{header: x-groups, claim: groups}]\n",
    ));
    let t = token(&ec.signing, Algorithm::ES256, "k", claims("carol"));

    // The default Authorization header is not a location any more.
    let (r, _) = check(&a, &t).await;
    assert_eq!(r, Ok(None));

    let mut h = HeaderMap::new();
    h.insert(
        "x-jwt",
        HeaderValue::from_str(&format!("Token {t}")).unwrap(),
    );
    h.insert("x-groups", HeaderValue::from_static("forged"));
    let c = a.authenticate(&mut h, None).await.unwrap().unwrap();
    assert_eq!(c.principal, format!("{ISS}/carol"));
    assert!(h.get("x-jwt").is_some(), "forwardOriginalToken keeps it");
    assert_eq!(h.get("x-groups").unwrap(), "admins");
    let payload = h.get("x-jwt-payload").unwrap().to_str().unwrap();
    let decoded: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    assert_eq!(decoded["sub"], "carol");

    let mut h = HeaderMap::new();
    let q = format!("a=1&jwt={t}");
    assert!(a.authenticate(&mut h, Some(&q)).await.unwrap().is_some());

    // A client-sent output header never survives, token or not.
    let mut h = HeaderMap::new();
    h.insert("x-jwt-payload", HeaderValue::from_static("forged"));
    assert_eq!(a.authenticate(&mut h, None).await, Ok(None));
    assert!(h.get("x-jwt-payload").is_none());
}

#[tokio::test]
async fn remote_keys_are_fetched_and_a_dead_uri_fails_closed_in_bounded_time() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ec = ec_key("remote");
    let doc = json!({ "keys": [ec.jwk] }).to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = served.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let doc = doc.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let _ = s.read(&mut buf).await;
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{doc}",
                    doc.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    let registry = crate::cluster::Registry::default();
    let rules: Vec<JwtRule> = serde_yaml::from_str(&format!(
        "- {{issuer: '{ISS}', jwksUri: 'http://{addr}/jwks.json'}}"
    ))
    .unwrap();
    let a = Authn::new(&rules, &registry).unwrap();
    let t = token(&ec.signing, Algorithm::ES256, "remote", claims("dave"));
    let (r, _) = check(&a, &t).await;
    assert_eq!(r.unwrap().unwrap().principal, format!("{ISS}/dave"));
    // A second config naming the same URI shares the fetched keys.
    let again = Authn::new(&rules, &registry).unwrap();
    let (r, _) = check(&again, &t).await;
    assert!(r.unwrap().is_some());
    assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 1);

    // Nothing listens: the request waits at most the rule's timeout.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let rules: Vec<JwtRule> = serde_yaml::from_str(&format!(
        "- {{issuer: '{ISS}', jwksUri: 'http://{dead_addr}/jwks.json', timeout: 300ms}}"
    ))
    .unwrap();
    let a = Authn::new(&rules, &registry).unwrap();
    let started = std::time::Instant::now();
    let (r, _) = check(&a, &t).await;
    assert_eq!(r, Err(Rejected::NoKeys));
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[test]
fn a_rule_without_keys_or_with_a_bad_uri_is_refused() {
    let registry = crate::cluster::Registry::default();
    for (yaml, want) in [
        ("- {issuer: a}", "one of jwks or jwksUri"),
        (
            "- {issuer: a, jwksUri: 'ftp://x/keys'}",
            "not an http(s) URL",
        ),
        ("- {issuer: a, jwks: '{nope'}", "jwks"),
    ] {
        let rules: Vec<JwtRule> = serde_yaml::from_str(yaml).unwrap();
        let e = Authn::new(&rules, &registry).unwrap_err();
        assert!(e.contains("jwtRules[0]") && e.contains(want), "{e}");
    }
}
