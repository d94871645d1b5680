// RFC 5322 section 3.3 date-time, written by hand on purpose: Foundation's
// DateFormatter opens /usr/share/zoneinfo and crashes (SIGILL) once a stage
// has chroot()ed, and Date:/Received: lines are written after the chroot.
// localtime_r only needs the zone loaded before (StageRuntime calls tzset()).

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Synchronization

public enum RFC5322Date {
    static let dayNames = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"]
    static let monthNames = ["Jan", "Feb", "Mar", "Apr", "May", "Jun",
                             "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]

    /// "Sun, 29 Nov 2026 16:13:43 +0100" in the local time zone of the
    /// process, with the numeric offset that localtime_r reports (tm_gmtoff).
    public static func format(unixTime: Int) -> String {
        var t = time_t(unixTime)
        var tmValue = tm()
        guard localtime_r(&t, &tmValue) != nil else {
            return format(unixTime: unixTime, utcOffsetSeconds: 0)
        }
        return format(unixTime: unixTime, utcOffsetSeconds: Int(tmValue.tm_gmtoff))
    }

    /// The current time, formatted as `format(unixTime:)` does. The text
    /// of the last second asked for is kept: smtp-listen asks for every
    /// message (its Received header), many times a second under load.
    public static func now() -> String {
        let unixTime = Int(time(nil))
        if let text = lastSecond.withLock({ $0?.unixTime == unixTime ? $0?.text : nil }) { return text }
        let text = format(unixTime: unixTime)
        lastSecond.withLock { $0 = (unixTime, text) }
        return text
    }

    private static let lastSecond = Mutex<(unixTime: Int, text: String)?>(nil)

    /// Pure form: the wall-clock time `utcOffsetSeconds` east of UTC. The
    /// offset is written in whole minutes (RFC 5322 has no seconds there;
    /// only historical local mean times had them).
    public static func format(unixTime: Int, utcOffsetSeconds: Int) -> String {
        let local = unixTime + utcOffsetSeconds
        let c = CivilTime(unixTime: local)
        let offsetMinutes = utcOffsetSeconds / 60
        let sign = offsetMinutes < 0 ? "-" : "+"
        let abs = offsetMinutes < 0 ? -offsetMinutes : offsetMinutes
        return "\(dayNames[c.weekday]), \(c.day) \(monthNames[c.month - 1]) \(c.year) "
            + "\(pad2(c.hour)):\(pad2(c.minute)):\(pad2(c.second)) "
            + "\(sign)\(pad2(abs / 60))\(pad2(abs % 60))"
    }

    static func pad2(_ v: Int) -> String { v < 10 ? "0\(v)" : "\(v)" }
    static func pad4(_ v: Int) -> String {
        let s = String(v)
        return s.count >= 4 ? s : String(repeating: "0", count: 4 - s.count) + s
    }
}

/// Broken-down UTC time from a Unix time (proleptic Gregorian calendar),
/// using Howard Hinnant's days-from-civil inverse: no tables, no time zones.
struct CivilTime: Equatable {
    var year: Int, month: Int, day: Int, hour: Int, minute: Int, second: Int
    var weekday: Int  // 0 = Sunday

    init(unixTime: Int) {
        var days = unixTime / 86400
        var secs = unixTime % 86400
        if secs < 0 { secs += 86400; days -= 1 }
        hour = secs / 3600
        minute = (secs % 3600) / 60
        second = secs % 60
        // 1970-01-01 was a Thursday.
        let wd = (days + 4) % 7
        weekday = wd < 0 ? wd + 7 : wd
        let z = days + 719468
        let era = (z >= 0 ? z : z - 146096) / 146097
        let doe = z - era * 146097
        let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100)
        let mp = (5 * doy + 2) / 153
        day = doy - (153 * mp + 2) / 5 + 1
        month = mp < 10 ? mp + 3 : mp - 9
        year = yoe + era * 400 + (month <= 2 ? 1 : 0)
    }

    /// "20261129161343" (UTC), used in Message-IDs.
    var compact: String {
        RFC5322Date.pad4(year) + RFC5322Date.pad2(month) + RFC5322Date.pad2(day)
            + RFC5322Date.pad2(hour) + RFC5322Date.pad2(minute) + RFC5322Date.pad2(second)
    }
}

extension RFC5322Date {
    static func currentUnixTime() -> Int { Int(time(nil)) }
}
