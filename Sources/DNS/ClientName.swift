// The verified name of an SMTP client (forward-confirmed reverse DNS, as
// Postfix's smtpd finds it): the PTR names of the client's address, of which
// the first whose A (or AAAA) records contain that address again. Anyone
// can put any name in the PTR records of their own addresses; only the
// forward check makes the name mean something, so an unverified name is
// never used ("unknown", as Postfix writes it).

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

extension IPAddress {
    /// "192.0.2.1" or "2001:db8::1" (inet_pton's forms); nil for anything else.
    public init?(text: String) {
        // inet_pton reads a C string: a NUL would end the text early.
        guard !text.utf8.contains(0) else { return nil }
        if text.utf8.contains(UInt8(ascii: ":")) {
            var v6 = [UInt8](repeating: 0, count: 16)
            guard inet_pton(AF_INET6, text, &v6) == 1, let address = IPv6Address(bytes: v6) else { return nil }
            self = .v6(address)
        } else {
            var v4 = [UInt8](repeating: 0, count: 4)
            guard inet_pton(AF_INET, text, &v4) == 1, let address = IPv4Address(bytes: v4) else { return nil }
            self = .v4(address)
        }
    }
}

extension Resolver {
    /// How many PTR names are checked at most (a list is rare; a long one
    /// only costs queries).
    public static let maximumClientNamesChecked = 4

    /// The reverse-lookup name of an IPv4 or IPv6 address in text form:
    /// "1.2.0.192.in-addr.arpa", nibbles under "ip6.arpa"; nil for
    /// anything else.
    public static func reverseName(of address: String) -> String? {
        guard let ip = IPAddress(text: address) else { return nil }
        switch ip {
        case .v4(let v4):
            return v4.bytes.reversed().map(String.init).joined(separator: ".") + ".in-addr.arpa"
        case .v6(let v6):
            let digits = Array("0123456789abcdef")
            var labels: [String] = []
            for byte in v6.bytes.reversed() {
                labels.append(String(digits[Int(byte & 0x0f)]))
                labels.append(String(digits[Int(byte >> 4)]))
            }
            return labels.joined(separator: ".") + ".ip6.arpa"
        }
    }

    /// Looks up the verified name of `address`; `completion` gets it (lower
    /// case, no trailing dot) with the shortest TTL of the answers used, or
    /// nil: no PTR record, no forward match, a failure or a timeout. It runs
    /// on the thread that pumps the resolver.
    public func verifiedName(of address: String, timeout: Duration? = nil,
                             completion: @escaping @Sendable (_ name: String?, _ ttl: UInt32) -> Void) {
        guard let ip = IPAddress(text: address), let reverse = Self.reverseName(of: address) else {
            completion(nil, 0)
            return
        }
        let forwardType: RRType
        if case .v4 = ip { forwardType = .a } else { forwardType = .aaaa }
        do throws(DNSError) {
            _ = try query(reverse, .ptr, timeout: timeout) { [self] result in
                guard case .success(let answer) = result, answer.rcode == .noError, answer.haveData else {
                    return completion(nil, Self.negativeTTL(result))
                }
                let names = answer.rdata.compactMap { try? DomainName.decode(wire: $0) }
                    .filter(\.isHostname).map { $0.text.lowercased() }
                confirm(Array(names.prefix(Self.maximumClientNamesChecked)), address: ip, type: forwardType,
                        ttl: answer.ttl, timeout: timeout, completion: completion)
            }
        } catch {
            completion(nil, 0)
        }
    }

    /// Tries each name in turn until one resolves back to `address`.
    private func confirm(_ names: [String], address: IPAddress, type: RRType, ttl: UInt32, timeout: Duration?,
                         completion: @escaping @Sendable (String?, UInt32) -> Void) {
        guard let name = names.first else { return completion(nil, ttl) }
        do throws(DNSError) {
            _ = try query(name, type, timeout: timeout) { [self] result in
                if case .success(let answer) = result, answer.rcode == .noError,
                   answer.rdata.contains(where: { Self.address($0, type: type) == address }) {
                    return completion(name, min(ttl, answer.ttl))
                }
                confirm(Array(names.dropFirst()), address: address, type: type, ttl: ttl, timeout: timeout,
                        completion: completion)
            }
        } catch {
            completion(nil, 0)
        }
    }

    private static func address(_ rdata: [UInt8], type: RRType) -> IPAddress? {
        if type == .a { return (try? IPv4Address(rdata: rdata)).map { .v4($0) } }
        return (try? IPv6Address(rdata: rdata)).map { .v6($0) }
    }

    /// A name that does not exist is an answer worth keeping a while; a
    /// failure is not.
    private static func negativeTTL(_ result: Result<DNSAnswer, DNSError>) -> UInt32 {
        if case .success(let answer) = result, answer.nxDomain || answer.rcode == .noError { return max(answer.ttl, 60) }
        return 0
    }
}
