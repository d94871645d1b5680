// queue-inject's decisions that need no I/O: how a refusal from the queue
// becomes an exit status, and how long to keep trying an unreachable queue.

public enum InjectionPolicy {
    /// The default total time spent retrying an unreachable queue.
    public static let defaultWait = 30.0

    /// REFUSED (code, status, text) -> sysexits status and the message for
    /// stderr: 4xx is temporary (EX_TEMPFAIL: the caller keeps the message
    /// and tries later) but for 4.5.3 "too many recipients", which is the
    /// data's fault (EX_DATAERR) as 5.3.4 "message too large" is; any other
    /// 5xx is EX_UNAVAILABLE.
    public static func refusal(code: UInt64, status: String, text: String) -> SubmissionError {
        let message = "refused: \(code) \(status) \(text)"
        // More recipients than the queue takes in one message: temporary
        // in SMTP (the client sends the rest in another transaction), but
        // the same submission would be refused again forever.
        if status == "4.5.3" { return SubmissionError(.dataErr, message + " (send the message to fewer recipients at a time)") }
        if code >= 400 && code < 500 || status.hasPrefix("4.") { return SubmissionError(.tempFail, message) }
        if status == "5.3.4" || status == "5.2.3" { return SubmissionError(.dataErr, message) }
        return SubmissionError(.unavailable, message)
    }

    /// SEALPOST_INJECT_WAIT: seconds (a non-negative number, at most a
    /// day); anything else, or nothing, is the default.
    public static func wait(environment value: String?) -> Double {
        guard let value, let v = Double(value), v >= 0, v.isFinite else { return defaultWait }
        return min(v, 86_400)
    }

    /// How long queue-inject waits for the queue at each step (the
    /// connect, each write, the answer to END) before it gives up on this
    /// attempt: a queue that is alive but stuck (stopped, a hung disk) must
    /// not keep cron jobs and web requests waiting forever. Long, because
    /// an answer that comes late is still an answer, and one given up on
    /// may leave the message queued twice (see the retry after END).
    public static let defaultTimeout = 300.0

    /// SEALPOST_INJECT_TIMEOUT: seconds (a positive number, at most a day);
    /// anything else, or nothing, is the default.
    public static func timeout(environment value: String?) -> Double {
        guard let value, let v = Double(value), v > 0, v.isFinite else { return defaultTimeout }
        return min(v, 86_400)
    }

    /// The pauses between attempts: 0.1 s doubling up to 5 s, as many as fit
    /// in `total` seconds (the last one shortened to end exactly there).
    public static func pauses(total: Double) -> [Double] {
        var out: [Double] = []
        var sum = 0.0
        var next = 0.1
        while sum < total {
            let p = min(next, total - sum)
            out.append(p)
            sum += p
            next = min(next * 2, 5)
        }
        return out
    }
}
