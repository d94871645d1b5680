// Whether message bytes hold any octet over 127: what decides that a body
// needs 8BITMIME (RFC 6152) when its submitter did not say so.

public enum EightBit {
    /// True when any byte of `bytes` is 0x80 or above. Eight bytes at a
    /// time: the queue asks this of every piece of every body.
    public static func occurs(in bytes: UnsafeRawBufferPointer) -> Bool {
        var i = 0
        let count = bytes.count
        var any: UInt64 = 0
        while i + 8 <= count {
            any |= bytes.loadUnaligned(fromByteOffset: i, as: UInt64.self)
            i += 8
        }
        while i < count {
            any |= UInt64(bytes[i])
            i += 1
        }
        return any & 0x8080_8080_8080_8080 != 0
    }

    public static func occurs(in bytes: [UInt8]) -> Bool {
        bytes.withUnsafeBytes { occurs(in: $0) }
    }
}
