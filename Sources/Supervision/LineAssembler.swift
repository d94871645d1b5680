// Turns the byte stream a stage writes on its stderr into log lines.

/// Buffers partial lines (bounded); a line longer than `maximumLength` is
/// split into pieces of that length, so one stage cannot make the supervisor
/// grow without bound.
public struct LineAssembler: Sendable {
    public let maximumLength: Int
    private var pending: [UInt8] = []

    public init(maximumLength: Int = 4096) {
        precondition(maximumLength > 0)
        self.maximumLength = maximumLength
    }

    /// Appends bytes and returns the complete lines (without their LF).
    public mutating func append<C: Collection<UInt8>>(_ bytes: C) -> [[UInt8]] {
        var lines: [[UInt8]] = []
        for byte in bytes {
            if byte == UInt8(ascii: "\n") {
                lines.append(pending)
                pending.removeAll(keepingCapacity: true)
            } else {
                pending.append(byte)
                if pending.count == maximumLength {
                    lines.append(pending)
                    pending.removeAll(keepingCapacity: true)
                }
            }
        }
        return lines
    }

    /// The partial line left at end of file, if any.
    public mutating func finish() -> [UInt8]? {
        guard !pending.isEmpty else { return nil }
        defer { pending.removeAll() }
        return pending
    }

    public var hasPartialLine: Bool { !pending.isEmpty }
}
