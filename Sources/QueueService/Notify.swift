// RFC 3461 NOTIFY: which delivery status notifications a recipient asked for.

import Spool

public struct NotifyConditions: OptionSet, Sendable, Hashable {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    public static let success = NotifyConditions(rawValue: 1)
    public static let failure = NotifyConditions(rawValue: 2)
    public static let delay = NotifyConditions(rawValue: 4)
    /// NOTIFY=NEVER.
    public static let never: NotifyConditions = []
    /// No NOTIFY parameter: RFC 3461 section 4.1 leaves the default to the
    /// MTA and suggests "FAILURE,DELAY"; that is what Sealpost does.
    public static let rfc3461Default: NotifyConditions = [.failure, .delay]

    /// Parses the `notify` attribute of a recipient (nil: absent). Unknown
    /// keywords are ignored rather than refused: the value was validated by
    /// whoever accepted the message, and a bounce is better than none.
    public init(parameter: String?) {
        guard let parameter else { self = .rfc3461Default; return }
        var result: NotifyConditions = []
        for word in parameter.split(separator: ",") {
            switch word.trimmingCharacters(in: " ").uppercased() {
            case "SUCCESS": result.insert(.success)
            case "FAILURE": result.insert(.failure)
            case "DELAY": result.insert(.delay)
            case "NEVER": self = .never; return
            default: continue
            }
        }
        self = result
    }
}

extension Substring {
    fileprivate func trimmingCharacters(in set: Character) -> Substring {
        var s = self
        while s.first == set { s.removeFirst() }
        while s.last == set { s.removeLast() }
        return s
    }
}
