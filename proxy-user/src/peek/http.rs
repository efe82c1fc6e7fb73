//! The HTTP/1.x request head, parsed by `httparse`, for the name in `Host`.
use super::{Malformed, Peeked, Progress, Protocol};

/// The largest request head read before deciding (nginx's default large_client_header_buffers
/// line is 8 KiB too).
pub const MAX_HEAD: usize = 8 * 1024;
/// More header lines than this in the first 8 KiB is not a browser or a client library.
const MAX_HEADERS: usize = 128;

/// Request methods that mark a stream as HTTP: RFC 9110's, PATCH, and WebDAV's. A method must
/// be followed by a space, so `SSH-2.0-...` or a binary protocol is never taken for HTTP.
const METHODS: &[&[u8]] = &[
    b"GET",
    b"HEAD",
    b"POST",
    b"PUT",
    b"DELETE",
    b"CONNECT",
    b"OPTIONS",
    b"TRACE",
    b"PATCH",
    b"PROPFIND",
    b"PROPPATCH",
    b"MKCOL",
    b"COPY",
    b"MOVE",
    b"LOCK",
    b"UNLOCK",
    b"REPORT",
    b"SEARCH",
    b"MKCALENDAR",
    b"PRI",
];

/// Whether `buf` starts like an HTTP request: `Some(true)` if a known method and a space start
/// it, `Some(false)` if it cannot, `None` if it is too short to tell.
pub fn looks_like_http(buf: &[u8]) -> Option<bool> {
    let mut undecided = false;
    for method in METHODS {
        let n = method.len() + 1;
        if buf.len() >= n {
            if &buf[..method.len()] == *method && buf[method.len()] == b' ' {
                return Some(true);
            }
        } else if method.starts_with(buf) {
            undecided = true;
        }
    }
    if undecided {
        None
    } else {
        Some(false)
    }
}

/// Looks at the bytes of an HTTP request so far: a complete head, more needed, or broken.
pub fn inspect(buf: &[u8]) -> Progress {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            return Progress::Failed(Malformed::TooLarge {
                claimed: buf.len(),
                limit: MAX_HEAD,
            })
        }
        Ok(httparse::Status::Partial) => return Progress::NeedMore,
        Err(httparse::Error::TooManyHeaders) => return Progress::Failed(Malformed::TooManyHeaders),
        Err(_) => return Progress::Failed(Malformed::HttpHead),
    }
    let mut peeked = Peeked::new(Protocol::Http);
    // An absolute-form target names the host and overrides Host (RFC 9112 3.2.2).
    let target_authority = request.path.and_then(authority_of_absolute);
    let mut hosts = request
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"));
    let host = match (hosts.next(), hosts.next()) {
        (_, Some(_)) => return Progress::Failed(Malformed::DuplicateHost),
        (Some(header), None) => Some(header.value),
        (None, None) => None,
    };
    let authority = target_authority.or(host.map(<[u8]>::trim_ascii));
    peeked.name = authority
        .map(strip_port)
        .filter(|name| !name.is_empty())
        .map(super::name::from_wire);
    Progress::Done(peeked)
}

/// The authority of `http://host:port/path`, if the target has that form.
fn authority_of_absolute(target: &str) -> Option<&[u8]> {
    let lower = target.get(..8).unwrap_or(target).to_ascii_lowercase();
    let rest = if lower.starts_with("http://") {
        &target[7..]
    } else if lower.starts_with("https://") {
        &target[8..]
    } else {
        return None;
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    // Drop user information, which RFC 9110 forbids in http URIs but clients may still send.
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    Some(authority.as_bytes())
}

/// `host:port` to `host`; `[v6]:port` to `[v6]`.
fn strip_port(authority: &[u8]) -> &[u8] {
    if authority.first() == Some(&b'[') {
        return match authority.iter().position(|&b| b == b']') {
            Some(end) => &authority[..=end],
            None => authority,
        };
    }
    match authority.iter().rposition(|&b| b == b':') {
        Some(colon) if authority[colon + 1..].iter().all(u8::is_ascii_digit) => &authority[..colon],
        _ => authority,
    }
}

/// The reply to an HTTP client no route matched (RFC 9110 15.5.20): the request reached a
/// server that cannot answer for that host.
pub fn misdirected_response() -> &'static [u8] {
    b"HTTP/1.1 421 Misdirected Request\r\n\
      Content-Type: text/plain; charset=utf-8\r\n\
      Content-Length: 39\r\n\
      Connection: close\r\n\
      \r\n\
      No service is configured for this host\n"
}
