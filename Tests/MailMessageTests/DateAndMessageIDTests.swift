import Testing
#if canImport(Glibc)
import Glibc
#endif
@testable import MailMessage

@Suite struct RFC5322DateTests {
    @Test(arguments: [
        (1795965223, 3600, "Sun, 29 Nov 2026 16:13:43 +0100"),
        (1795965223, 0, "Sun, 29 Nov 2026 15:13:43 +0000"),
        (0, 0, "Thu, 1 Jan 1970 00:00:00 +0000"),
        (-1, 0, "Wed, 31 Dec 1969 23:59:59 +0000"),
        (951868799, 0, "Tue, 29 Feb 2000 23:59:59 +0000"),
        (951868799, 60, "Wed, 1 Mar 2000 00:00:59 +0001"),
        (4107585600, -18000, "Mon, 1 Mar 2100 07:00:00 -0500"),
        (1795965223, 19800, "Sun, 29 Nov 2026 20:43:43 +0530"),
        (1795965223, -34200, "Sun, 29 Nov 2026 05:43:43 -0930"),
    ])
    func fixedOffset(time: Int, offset: Int, expected: String) {
        #expect(RFC5322Date.format(unixTime: time, utcOffsetSeconds: offset) == expected)
    }

    @Test func localTimeUsesTmGmtoff() {
        let t = 1795965223
        var tt = time_t(t)
        var tmv = tm()
        _ = localtime_r(&tt, &tmv)
        #expect(RFC5322Date.format(unixTime: t) == RFC5322Date.format(unixTime: t, utcOffsetSeconds: Int(tmv.tm_gmtoff)))
    }

    /// Every day of 1969..2101 agrees with a naive day-by-day calendar walk.
    @Test func civilCalendarAgreesWithDayWalk() {
        var y = 1969, m = 1, d = 1, wd = 3   // 1969-01-01 was a Wednesday
        func isLeap(_ y: Int) -> Bool { (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 }
        let lengths = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
        var day = -365
        while y < 2102 {
            let c = CivilTime(unixTime: day * 86400 + 43210)
            #expect(c.year == y && c.month == m && c.day == d && c.weekday == wd,
                    "day \(day): \(c) != \(y)-\(m)-\(d)")
            if c.year != y || c.month != m || c.day != d { return }
            day += 1; wd = (wd + 1) % 7; d += 1
            let len = m == 2 && isLeap(y) ? 29 : lengths[m - 1]
            if d > len { d = 1; m += 1 }
            if m > 12 { m = 1; y += 1 }
        }
    }
}

@Suite struct MessageIDTests {
    struct Fixed: RandomNumberGenerator {
        var value: UInt64
        mutating func next() -> UInt64 { value }
    }

    @Test func shape() {
        var rng = Fixed(value: 0x4F3A2B1C5D6E)
        #expect(MessageID.generate(hostname: "mx.example.org", unixTime: 1795965223, using: &rng)
                == "<20261129151343.00004F3A2B1C5D6E@mx.example.org>")
    }

    @Test func badHostnameIsReplaced() {
        var rng = Fixed(value: 1)
        for bad in ["", "a b", "host..example", "x@y", ".example"] {
            let id = MessageID.generate(hostname: bad, unixTime: 0, using: &rng)
            #expect(id.hasSuffix("@localhost>"), "\(bad) -> \(id)")
        }
    }

    @Test func randomIDsDiffer() {
        let ids = Set((0..<100).map { _ in MessageID.generate(hostname: "h.example") })
        #expect(ids.count == 100)
        for id in ids {
            #expect(id.hasPrefix("<") && id.hasSuffix("@h.example>"))
            #expect((try? AddressList.parseSingle(id)) != nil, "\(id) is a valid msg-id / addr-spec")
        }
    }
}
