// `sealpost user ...`: the SMTP AUTH accounts of the password file
// (smtp.auth_users, default Config/users; format in
// Sources/Accounts/PasswordFile.swift).
//
// Passwords are never taken from the command line (they would show in ps
// and in shell history): from a terminal they are asked twice with echo
// off; otherwise one line is read from standard input, for scripts
// ("echo secret | sealpost user add alice"). Each change rewrites the file
// atomically (Accounts: temporary file, fsync, rename); a new file is
// created 0600, an existing one keeps its owner, group and mode. A change
// takes PATH.lock first (another change at the same time exits 75).
// smtp-listen reads the file at start only: restart it to apply a change.

import Accounts
import ArgumentParser
import SealpostConfig
import Sodium
#if canImport(Glibc)
import Glibc
#endif

struct UserCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "user",
        abstract: "Manage the SMTP AUTH accounts (the password file smtp.auth_users).",
        subcommands: [Add.self, Passwd.self, Delete.self, List.self, Senders.self])

    struct Options: ParsableArguments {
        @Option(name: .long, help: ArgumentHelp("Configuration file (default: $SEALPOST_CONFIG, the checkout's Config/sealpost.toml, /etc/sealpost/sealpost.toml).", valueName: "file"))
        var config: String?

        func configuration() throws(AdminFailure) -> SealpostConfiguration {
            do {
                return try SealpostConfiguration.load(path: config ?? SealpostConfiguration.locate())
            } catch {
                throw AdminFailure(message: error.description, exitCode: SysExit.config)
            }
        }

        /// The file's path and its accounts (none yet when it does not exist).
        /// `forChange`: first takes PATH.lock (flock, held until the command
        /// exits), so that two changes at once cannot both read the old file
        /// and the second rename drop the first one's account: the O_EXCL
        /// of PATH.tmp only guards the write, not the read before it.
        func passwordFile(forChange: Bool = false) throws(AdminFailure) -> (String, PasswordFile, SealpostConfiguration) {
            let config = try configuration()
            let path = config.smtp.authUsersFile
            if forChange { try UserCommand.lockForChange(path) }
            do {
                return (path, try PasswordFile.loadOrEmpty(path: path), config)
            } catch {
                throw AdminFailure(message: error.description, exitCode: SysExit.config)
            }
        }
    }

    struct Add: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Add an account; the password is asked twice on a terminal, else read as one line from standard input.")
        @OptionGroup var options: Options
        @Option(name: .customLong("sender"), help: ArgumentHelp("An envelope sender the account may use (an address, or @domain); repeat for more. Default: NAME@each local domain.", valueName: "address"))
        var senders: [String] = []
        @Argument(help: "The login name (letters, digits, . _ - +, or a whole address).") var name: String

        func run() throws {
            try reporting { () throws(AdminFailure) in
                try UserCommand.checkName(name)
                let list = try UserCommand.parseSenders(senders)
                let (path, file, _) = try options.passwordFile(forChange: true)
                guard file.entry(named: name) == nil else {
                    throw AdminFailure(message: "user \(name) already exists in \(path) (change its password with: sealpost user passwd \(name))", exitCode: SysExit.dataErr)
                }
                let hash = try UserCommand.hash(try PasswordInput.read(confirm: true))
                var updated = file
                updated.set(PasswordEntry(name: name, hash: hash, senders: list))
                try UserCommand.save(updated, path: path)
                Output.out("user \(name) added to \(path)\(UserCommand.restartHint)\n")
            }
        }
    }

    struct Passwd: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Change an account's password.")
        @OptionGroup var options: Options
        @Argument(help: "The login name.") var name: String

        func run() throws {
            try reporting { () throws(AdminFailure) in
                let (path, file, _) = try options.passwordFile(forChange: true)
                guard var entry = file.entry(named: name) else {
                    throw AdminFailure(message: "no user \(name) in \(path)", exitCode: SysExit.noUser)
                }
                entry.hash = try UserCommand.hash(try PasswordInput.read(confirm: true))
                var updated = file
                updated.set(entry)
                try UserCommand.save(updated, path: path)
                Output.out("password of \(name) changed in \(path)\(UserCommand.restartHint)\n")
            }
        }
    }

    struct Delete: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Delete an account.")
        @OptionGroup var options: Options
        @Argument(help: "The login name.") var name: String

        func run() throws {
            try reporting { () throws(AdminFailure) in
                let (path, file, _) = try options.passwordFile(forChange: true)
                var updated = file
                guard updated.remove(named: name) else {
                    throw AdminFailure(message: "no user \(name) in \(path)", exitCode: SysExit.noUser)
                }
                try UserCommand.save(updated, path: path)
                Output.out("user \(name) deleted from \(path)\(UserCommand.restartHint)\n")
            }
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List the accounts and the senders each may use.")
        @OptionGroup var options: Options

        func run() throws {
            try reporting { () throws(AdminFailure) in
                let (_, file, config) = try options.passwordFile()
                let authenticator = Authenticator(file: file, localDomains: config.local.domains)
                var text = ""
                for entry in file.entries {
                    let senders = authenticator.senders(of: entry.name).joined(separator: ",")
                    text += "\(entry.name)\t\(senders)\(entry.senders == nil ? " (default)" : "")\n"
                }
                Output.out(text)
            }
        }
    }

    struct Senders: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Set the envelope senders an account may use (addresses or @domain); none: back to NAME@each local domain.")
        @OptionGroup var options: Options
        @Argument(help: "The login name.") var name: String
        @Argument(help: "Addresses or @domain patterns.") var senders: [String] = []

        func run() throws {
            try reporting { () throws(AdminFailure) in
                let list = try UserCommand.parseSenders(senders)
                let (path, file, _) = try options.passwordFile(forChange: true)
                guard var entry = file.entry(named: name) else {
                    throw AdminFailure(message: "no user \(name) in \(path)", exitCode: SysExit.noUser)
                }
                entry.senders = list
                var updated = file
                updated.set(entry)
                try UserCommand.save(updated, path: path)
                Output.out("senders of \(name) set in \(path)\(UserCommand.restartHint)\n")
            }
        }
    }

    static let restartHint = " (smtp-listen reads it at start: restart it to apply)"

    static func checkName(_ name: String) throws(AdminFailure) {
        guard PasswordFile.isValidName(name) else {
            throw AdminFailure(message: "not a user name: \"\(name)\" (letters, digits, \".\", \"_\", \"-\", \"+\", at most 128, not starting with \".\" or \"-\"; or a whole address)", exitCode: SysExit.usage)
        }
    }

    static func parseSenders(_ senders: [String]) throws(AdminFailure) -> [String]? {
        guard !senders.isEmpty else { return nil }
        switch PasswordFile.parseSenders(senders.joined(separator: ",")) {
        case .success(let list): return list
        case .failure(let error): throw AdminFailure(message: error.message, exitCode: SysExit.usage)
        }
    }

    static func hash(_ password: String) throws(AdminFailure) -> String {
        do {
            return try PasswordHash.hash(password)
        } catch {
            throw AdminFailure(message: "cannot hash the password: \(error)", exitCode: SysExit.software)
        }
    }

    /// The lock of `lockForChange`, open until the process exits.
    nonisolated(unsafe) private static var changeLock: Int32 = -1

    static func lockForChange(_ path: String) throws(AdminFailure) {
        let lockPath = path + ".lock"
        let fd = open(lockPath, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard fd >= 0 else {
            throw AdminFailure(message: "cannot open \(lockPath): \(String(cString: strerror(errno)))", exitCode: SysExit.canTCreat)
        }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            let busy = errno == EWOULDBLOCK
            let reason = String(cString: strerror(errno))
            close(fd)
            throw AdminFailure(message: busy ? "another sealpost user command is changing \(path); try again when it is done"
                                             : "cannot lock \(lockPath): \(reason)", exitCode: SysExit.tempFail)
        }
        changeLock = fd
    }

    static func save(_ file: PasswordFile, path: String) throws(AdminFailure) {
        do {
            try file.write(path: path, holdingLock: changeLock >= 0)
        } catch {
            throw AdminFailure(message: error.description, exitCode: SysExit.canTCreat)
        }
    }
}

/// The password from the terminal (twice, echo off) or from standard input.
enum PasswordInput {
    /// SASL PLAIN and LOGIN carry at most 255 octets (SMTP's parser's limit).
    static let maximumLength = 255

    static func read(confirm: Bool) throws(AdminFailure) -> String {
        let password: String
        if isatty(0) == 1 {
            password = try prompt("Password: ")
            if confirm {
                let again = try prompt("Retype password: ")
                guard again == password else { throw AdminFailure(message: "the passwords differ; nothing changed", exitCode: SysExit.usage) }
            }
        } else {
            guard let line = Input.lineBytes(fd: 0) else {
                throw AdminFailure(message: "no password on standard input (one line expected)", exitCode: SysExit.usage)
            }
            password = try utf8(line)
        }
        try check(password)
        return password
    }

    static func check(_ password: String) throws(AdminFailure) {
        guard !password.isEmpty else { throw AdminFailure(message: "empty password refused", exitCode: SysExit.usage) }
        guard password.utf8.count <= maximumLength else {
            throw AdminFailure(message: "password longer than \(maximumLength) octets (SMTP AUTH cannot carry it)", exitCode: SysExit.usage)
        }
        guard !password.utf8.contains(where: { $0 == 0 || $0 == 10 || $0 == 13 }) else {
            throw AdminFailure(message: "password contains NUL, CR or LF", exitCode: SysExit.usage)
        }
    }

    /// Prompts on stderr and reads a line from the terminal on fd 0 with
    /// echo off; the terminal's mode is restored whatever happens.
    private static func prompt(_ text: String) throws(AdminFailure) -> String {
        Output.err(text)
        var saved = termios()
        guard tcgetattr(0, &saved) == 0 else {
            throw AdminFailure(message: "cannot read the terminal settings: \(String(cString: strerror(errno)))", exitCode: SysExit.ioErr)
        }
        var quiet = saved
        quiet.c_lflag &= ~tcflag_t(ECHO)
        quiet.c_lflag |= tcflag_t(ECHONL)
        // A signal (Ctrl-C) while echo is off must not leave the terminal
        // so: the handlers put the settings back, then die of the signal.
        terminalToRestore = saved
        let signals = [SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGTSTP]
        let previous = signals.map { signal($0, restoreTerminalAndDie) }
        defer {
            _ = tcsetattr(0, TCSAFLUSH, &saved)
            for (sig, handler) in zip(signals, previous) { signal(sig, handler) }
            terminalToRestore = nil
        }
        guard tcsetattr(0, TCSAFLUSH, &quiet) == 0 else {
            // Never ask for a password the terminal would show.
            throw AdminFailure(message: "cannot turn off the terminal's echo: \(String(cString: strerror(errno)))", exitCode: SysExit.ioErr)
        }
        guard let line = Input.lineBytes(fd: 0) else {
            throw AdminFailure(message: "no password given", exitCode: SysExit.usage)
        }
        return try utf8(line)
    }

    /// SMTP AUTH carries UTF-8 (RFC 4954, and the server refuses anything
    /// else): a password in another encoding (Latin-1 from a script) would
    /// be stored as something no client can send.
    private static func utf8(_ bytes: [UInt8]) throws(AdminFailure) -> String {
        guard let text = String(validating: bytes, as: UTF8.self) else {
            throw AdminFailure(message: "the password is not valid UTF-8 (SMTP AUTH carries UTF-8); nothing changed", exitCode: SysExit.dataErr)
        }
        return text
    }
}

/// The terminal settings from before the password prompt, for the signal
/// handler (a C function: no captures, async-signal-safe calls only).
nonisolated(unsafe) private var terminalToRestore: termios?

private func restoreTerminalAndDie(_ sig: Int32) {
    if var settings = terminalToRestore { _ = tcsetattr(0, TCSAFLUSH, &settings) }
    signal(sig, SIG_DFL)
    raise(sig)
}
