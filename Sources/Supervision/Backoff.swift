// Restart policy: 1 s after the first failure, doubling up to 60 s; a stage
// that stayed up for 60 s is considered healthy again and starts over at 1 s.

public struct Backoff: Sendable, Equatable {
    public static let initialDelay = 1
    public static let maximalDelay = 60
    /// Uptime after which the next failure starts over at `initialDelay`.
    public static let healthyUptime = 60

    /// The delay the next restart will wait, in seconds.
    public private(set) var nextDelay: Int = Backoff.initialDelay

    public init() {}

    /// Records an exit after `uptime` seconds and returns how long to wait
    /// before starting the stage again.
    public mutating func delayAfterExit(uptime: Double) -> Int {
        if uptime >= Double(Backoff.healthyUptime) { nextDelay = Backoff.initialDelay }
        let delay = nextDelay
        nextDelay = min(nextDelay * 2, Backoff.maximalDelay)
        return delay
    }
}
