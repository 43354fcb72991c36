//! Many datagrams per system call: `recvmmsg` and `sendmmsg` on a UDP socket that tokio owns.
//!
//! The one `unsafe` of the WebRTC transport, and why: neither std nor tokio offers the batched
//! calls, and a syscall per datagram was the cost that mattered (`sendto` ~0.7 µs, `recvfrom`
//! ~0.2 µs per 100 B datagram here, against a few µs of WebRTC work per datagram). The crates
//! that wrap them (quinn-udp) batch GSO segments to one destination, not datagrams to many.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

/// Datagrams moved per call at most.
pub const BATCH: usize = 32;
/// Largest datagram taken in; WebRTC stays under ~1,200 bytes. Longer ones are truncated by the
/// kernel and dropped here.
pub const MAX_DATAGRAM: usize = 2048;

/// Buffers for one `recvmmsg` call.
pub struct RecvBatch {
    bufs: Vec<[u8; MAX_DATAGRAM]>,
    /// (source, length) of each datagram the last call filled.
    got: Vec<(SocketAddr, usize)>,
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self { bufs: vec![[0; MAX_DATAGRAM]; BATCH], got: Vec::with_capacity(BATCH) }
    }
}

impl RecvBatch {
    /// Reads up to [`BATCH`] datagrams without blocking; `WouldBlock` when there are none.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        self.got.clear();
        // SAFETY: zeroed sockaddr_storage, iovec and mmsghdr are valid (all-integer/pointer C
        // structs). Every pointer set below points into `names`, `iovs` or `self.bufs`, which
        // outlive the call; lengths are those of the buffers they describe.
        #[allow(unsafe_code)]
        let (received, names, hdrs) = unsafe {
            let mut names: [libc::sockaddr_storage; BATCH] = zeroed();
            let mut iovs: [libc::iovec; BATCH] = zeroed();
            let mut hdrs: [libc::mmsghdr; BATCH] = zeroed();
            for i in 0..BATCH {
                iovs[i] = libc::iovec { iov_base: self.bufs[i].as_mut_ptr().cast(), iov_len: MAX_DATAGRAM };
                let h = &mut hdrs[i].msg_hdr;
                h.msg_name = (&raw mut names[i]).cast();
                h.msg_namelen = size_of::<libc::sockaddr_storage>() as u32;
                h.msg_iov = &raw mut iovs[i];
                h.msg_iovlen = 1;
            }
            let n = libc::recvmmsg(fd, hdrs.as_mut_ptr(), BATCH as u32, libc::MSG_DONTWAIT, std::ptr::null_mut());
            (n, names, hdrs)
        };
        if received < 0 {
            return Err(io::Error::last_os_error());
        }
        for i in 0..received as usize {
            let truncated = hdrs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            if let (false, Some(source)) = (truncated, from_storage(&names[i])) {
                self.got.push((source, hdrs[i].msg_len as usize));
            }
        }
        Ok(received as usize)
    }

    /// The datagrams of the last call: (source, bytes).
    pub fn datagrams(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> {
        self.got.iter().zip(&self.bufs).map(|(&(source, len), buf)| (source, &buf[..len]))
    }
}

/// Sends every datagram in `out` (destination, bytes) with as few calls as it takes. Returns how
/// many went out; the rest were refused by the kernel (a full send buffer or an unreachable
/// address) and are dropped, as a lossy network would. Also returns the number of calls.
pub fn send_all(fd: RawFd, out: &[(SocketAddr, Vec<u8>)]) -> (usize, usize) {
    let (mut sent, mut calls) = (0, 0);
    let mut at = 0;
    while at < out.len() {
        let chunk = &out[at..(at + BATCH).min(out.len())];
        calls += 1;
        match send_batch(fd, chunk) {
            Ok(n) if n > 0 => {
                sent += n;
                at += n;
            }
            // A full socket buffer: drop what is left of this round.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            // The first datagram was refused (e.g. an address the route rejects): skip it.
            _ => at += 1,
        }
    }
    (sent, calls)
}

fn send_batch(fd: RawFd, chunk: &[(SocketAddr, Vec<u8>)]) -> io::Result<usize> {
    // SAFETY: as in `RecvBatch::recv`; the kernel only reads through the pointers, which point
    // into `names`, `iovs` and `chunk`, all alive across the call.
    #[allow(unsafe_code)]
    let n = unsafe {
        let mut names: [libc::sockaddr_storage; BATCH] = zeroed();
        let mut iovs: [libc::iovec; BATCH] = zeroed();
        let mut hdrs: [libc::mmsghdr; BATCH] = zeroed();
        for (i, (dest, bytes)) in chunk.iter().enumerate() {
            let len = to_storage(*dest, &mut names[i]);
            iovs[i] = libc::iovec { iov_base: bytes.as_ptr().cast_mut().cast(), iov_len: bytes.len() };
            let h = &mut hdrs[i].msg_hdr;
            h.msg_name = (&raw mut names[i]).cast();
            h.msg_namelen = len;
            h.msg_iov = &raw mut iovs[i];
            h.msg_iovlen = 1;
        }
        libc::sendmmsg(fd, hdrs.as_mut_ptr(), chunk.len() as u32, libc::MSG_DONTWAIT)
    };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

fn from_storage(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(s.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, which it is large and
            // aligned enough for.
            #[allow(unsafe_code)]
            let a = unsafe { &*std::ptr::from_ref(s).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(a.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            #[allow(unsafe_code)]
            let a = unsafe { &*std::ptr::from_ref(s).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(ip, u16::from_be(a.sin6_port), a.sin6_flowinfo, a.sin6_scope_id)))
        }
        _ => None,
    }
}

fn to_storage(addr: SocketAddr, s: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for a sockaddr_in.
            #[allow(unsafe_code)]
            let out = unsafe { &mut *std::ptr::from_mut(s).cast::<libc::sockaddr_in>() };
            out.sin_family = libc::AF_INET as libc::sa_family_t;
            out.sin_port = a.port().to_be();
            out.sin_addr = libc::in_addr { s_addr: u32::from(*a.ip()).to_be() };
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            #[allow(unsafe_code)]
            let out = unsafe { &mut *std::ptr::from_mut(s).cast::<libc::sockaddr_in6>() };
            out.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            out.sin6_port = a.port().to_be();
            out.sin6_addr = libc::in6_addr { s6_addr: a.ip().octets() };
            out.sin6_flowinfo = a.flowinfo();
            out.sin6_scope_id = a.scope_id();
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn a_batch_goes_out_in_one_call_and_comes_in_whole() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let dest = rx.local_addr().unwrap();
        let out: Vec<_> = (0..40u8).map(|i| (dest, vec![i; usize::from(i) + 1])).collect();
        let (sent, calls) = send_all(tx.as_raw_fd(), &out);
        assert_eq!((sent, calls), (40, 2));
        let mut batch = RecvBatch::default();
        let mut seen = Vec::new();
        while seen.len() < 40 {
            match batch.recv(rx.as_raw_fd()) {
                Ok(_) => seen.extend(batch.datagrams().map(|(src, d)| (src, d.to_vec()))),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        assert!(seen.iter().all(|(src, _)| *src == tx.local_addr().unwrap()));
        assert_eq!(
            seen.iter().map(|(_, d)| d.clone()).collect::<Vec<_>>(),
            out.into_iter().map(|(_, d)| d).collect::<Vec<_>>()
        );
    }

    #[test]
    fn addresses_round_trip_through_the_c_structs() {
        for addr in ["127.0.0.1:9", "[::1]:65535", "[fe80::1%2]:80"] {
            let addr: SocketAddr = addr.parse().unwrap();
            // SAFETY (test): zeroed storage is valid.
            #[allow(unsafe_code)]
            let mut s: libc::sockaddr_storage = unsafe { zeroed() };
            to_storage(addr, &mut s);
            assert_eq!(from_storage(&s), Some(addr));
        }
    }
}
