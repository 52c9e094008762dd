//! Every limit a peer or a service controls, in one place, with where it is specified.
//!
//! Defaults that a config file may change live in `config`; the values here are either
//! fixed by a protocol or are hard ceilings that no configuration may exceed.

/// Default TCP/UDP port of the Forward protocol.
/// <https://github.com/fluent/fluentd/wiki/Forward-Protocol-Specification-v1>
pub const FORWARD_PORT: u16 = 24224;

/// Default port of the JSON-lines input (Fluent Bit's `in_tcp` default).
/// <https://docs.fluentbit.io/manual/pipeline/inputs/tcp>
pub const JSON_LINES_PORT: u16 = 5170;

/// Fluentd's `in_http` default port.
pub const HTTP_PORT: u16 = 9880;

/// The EventTime ext type: 8 bytes, big-endian u32 seconds then u32 nanoseconds.
/// <https://github.com/fluent/fluentd/wiki/Forward-Protocol-Specification-v1#eventtime-ext-format>
pub const EVENT_TIME_EXT: i8 = 0;

/// The Forward protocol answers a UDP heartbeat with this one-byte payload (Fluentd's
/// `in_forward` `HEARTBEAT_UDP_PAYLOAD`).
pub const HEARTBEAT_REPLY: &[u8] = b"\0";

/// Longest `chunk` option we echo back in an ack. Clients send 24-character base64 ids
/// (fluent-logger-golang, Fluent Bit) or 32 hex digits (Fluentd); the spec gives no bound.
pub const MAX_CHUNK_ID: usize = 128;

/// Longest Forward tag. Tags are short (Kubernetes' are a few hundred bytes at most), and
/// a tag is copied into every event a frame carries, so a long one would multiply.
pub const MAX_TAG: usize = 1024;

/// Deepest msgpack or JSON nesting we transcode; deeper input is refused, never recursed.
pub const MAX_DEPTH: usize = 64;

/// Largest UDP datagram we read (the IPv4 UDP payload maximum).
pub const MAX_DATAGRAM: usize = 65_507;

/// Ceiling for `max_frame_bytes`: a connection's buffer never grows past this.
pub const MAX_FRAME_CEILING: usize = 256 << 20;

/// Size of one read from a socket when the decoder has no better hint.
pub const READ_CHUNK: usize = 64 << 10;

/// simd-json needs this many readable bytes after a document it parses in place.
pub const JSON_PADDING: usize = simd_json::INPUT_PADDING;

/// Largest distinct-tag cache per core before it is cleared.
pub const ROUTE_CACHE_TAGS: usize = 4096;
