//! Temporary stand-in with the API of the JWE module being written.
#![allow(missing_docs, dead_code)]

#[derive(Debug, thiserror::Error)]
#[error("stub")]
pub struct KeyError;

#[derive(Debug, thiserror::Error)]
#[error("stub")]
pub struct SealError;

#[derive(Debug)]
pub struct ConsumerKey;

impl ConsumerKey {
    pub fn from_pem(_pem: &str) -> Result<ConsumerKey, KeyError> {
        Err(KeyError)
    }
    pub fn kid(&self) -> &str {
        ""
    }
    pub fn alg(&self) -> &'static str {
        ""
    }
    pub fn seal(&self, _plaintext: &[u8]) -> Result<String, SealError> {
        Err(SealError)
    }
}
