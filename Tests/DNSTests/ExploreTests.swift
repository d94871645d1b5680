import Testing
import DNS

@Test(.enabled(if: DNSTestbed.available, DNSTestbed.unavailableReason))
func explore() throws {
    for make in [{ try DNSTestbed.resolver() }, { try DNSTestbed.stubResolver() }] {
        let r = try make()
        for (n, t) in [("dane.test", RRType.mx), ("_25._tcp.mxbogus.dane.test", .tlsa), ("_25._tcp.mx1.dane.test", .tlsa),
                       ("nosuch.dane.test", .a), ("insecure.test", .mx), ("alias.dane.test", .a), ("_mta-sts.dane.test", .txt),
                       ("nowhere.example", .a)] {
            do {
                let a = try r.resolve(n, t)
                print("EXPLORE", a, a.rdata.count, a.canonicalName ?? "-")
            } catch { print("EXPLORE", n, error) }
        }
    }
}
