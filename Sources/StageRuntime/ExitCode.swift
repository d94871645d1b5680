/// Process exit codes, sysexits.h values: the supervisor and sendmail-style
/// callers tell temporary (75) from permanent failures by them.
public enum ExitCode: Int32, Sendable {
    case ok = 0
    case usage = 64
    case dataErr = 65
    case noInput = 66
    case noUser = 67
    case noHost = 68
    case unavailable = 69
    case software = 70
    case osErr = 71
    case canTCreat = 73
    case ioErr = 74
    case tempFail = 75
    case protocolErr = 76
    case noPerm = 77
    case config = 78
}
