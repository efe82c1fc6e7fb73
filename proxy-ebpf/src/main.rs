//! spliced's in-kernel data path: one `sk_skb/stream_verdict` program and its maps.
//!
//! Every socket of a spliced connection sits in two SOCKHASHes keyed by socket cookie:
//! `TARGETS` (cookie -> the peer socket; no program attached) and `ACTIVE` (cookie -> the socket
//! itself; this program attached). Cookies, not 4-tuples, because two `fe80::` peers on different
//! interfaces can share a 4-tuple and `__sk_buff` carries no scope id.
//! Verdict-only mode (no stream parser) needs Linux 5.10.
#![no_std]
#![no_main]

mod object;
mod verdict;
