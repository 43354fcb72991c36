//! A room's tick clock. tokio's `sleep` works at millisecond granularity (a deadline is rounded
//! up to the next millisecond, then served when the timer wheel gets there: up to 2 ms late),
//! which is most of a tick's jitter budget. On Linux each room gets a `timerfd` instead, armed
//! for the exact deadline and awaited through tokio's reactor, which wakes within microseconds.

use std::io;

use tokio::time::Instant;

/// Sleeps until deadlines, precisely.
pub struct Clock {
    #[cfg(target_os = "linux")]
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
    /// The deadline the timer is armed for, so that waiting again (after the room woke up for
    /// a message) does not re-arm it.
    armed: Option<Instant>,
}

impl Clock {
    #[allow(unsafe_code)]
    pub fn new() -> io::Result<Self> {
        #[cfg(target_os = "linux")]
        {
            use rustix::time::{TimerfdClockId, TimerfdFlags, timerfd_create};
            use tokio::io::Interest;
            use tokio::io::unix::AsyncFd;
            let fd = timerfd_create(TimerfdClockId::Monotonic, TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC)?;
            // SAFETY: an `OwnedFd` is an open descriptor that keeps its number until it is
            // dropped, and the `AsyncFd` owns it, so it outlives the registration.
            let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(io::Error::from)?;
            Ok(Self { fd, armed: None })
        }
        #[cfg(not(target_os = "linux"))]
        Ok(Self { armed: None })
    }

    /// Waits until `due`. Cancel-safe: dropped before `due`, the next call for the same `due`
    /// goes on waiting for the same expiry.
    pub async fn sleep_until(&mut self, due: Instant) -> io::Result<()> {
        #[cfg(target_os = "linux")]
        {
            use rustix::time::{Itimerspec, TimerfdTimerFlags, Timespec, timerfd_settime};
            if self.armed != Some(due) {
                let left = due.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    self.armed = None;
                    return Ok(());
                }
                let value = Timespec { tv_sec: left.as_secs() as i64, tv_nsec: i64::from(left.subsec_nanos()) };
                let spec = Itimerspec { it_interval: Timespec { tv_sec: 0, tv_nsec: 0 }, it_value: value };
                timerfd_settime(self.fd.get_ref(), TimerfdTimerFlags::empty(), &spec)?;
                self.armed = Some(due);
            }
            loop {
                let mut ready = self.fd.readable().await?;
                let mut expirations = [0u8; 8];
                match ready.try_io(|fd| Ok(rustix::io::read(fd.get_ref(), &mut expirations)?)) {
                    Ok(Ok(_)) => {
                        self.armed = None;
                        return Ok(());
                    }
                    Ok(Err(e)) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
                    _ => {}
                }
            }
        }
        #[cfg(not(target_os = "linux"))]
        {
            self.armed = Some(due);
            tokio::time::sleep_until(due).await;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn wakes_at_the_deadline_within_a_fraction_of_a_millisecond() {
        let mut clock = Clock::new().unwrap();
        let mut worst = Duration::ZERO;
        for i in 1..=20 {
            let due = Instant::now() + Duration::from_micros(1500 + i * 100);
            clock.sleep_until(due).await.unwrap();
            let late = Instant::now().saturating_duration_since(due);
            assert!(Instant::now() >= due, "never early");
            worst = worst.max(late);
        }
        // tokio's sleep is commonly 1-2 ms late; allow a loaded test machine some slack.
        assert!(worst < Duration::from_millis(5), "{worst:?}");
    }

    #[tokio::test]
    async fn a_cancelled_wait_resumes_for_the_same_deadline() {
        let mut clock = Clock::new().unwrap();
        let due = Instant::now() + Duration::from_millis(30);
        let first = tokio::time::timeout(Duration::from_millis(5), clock.sleep_until(due)).await;
        assert!(first.is_err(), "cancelled before the deadline");
        clock.sleep_until(due).await.unwrap();
        assert!(Instant::now() >= due);
    }
}
