//! Reading an HTTP answer (a remote function's, a schema registry's): at most so many
//! bytes, since a server that never stops would otherwise fill memory, and quoted in
//! errors in part.

/// How much of a response body an error message quotes.
const EXCERPT_CHARS: usize = 200;

pub enum Capped {
    Failed(reqwest::Error),
    /// Longer than this.
    Over(usize),
}

/// The body of `response`, up to `cap` bytes.
pub async fn read_capped(mut response: reqwest::Response, cap: usize) -> Result<Vec<u8>, Capped> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(Capped::Failed)? {
        if body.len() + chunk.len() > cap {
            return Err(Capped::Over(cap));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

pub fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return "(empty body)".to_string();
    }
    let mut out: String = text.chars().take(EXCERPT_CHARS).collect();
    if out.len() < text.len() {
        out.push('…');
    }
    out
}
