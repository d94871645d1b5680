#if canImport(Glibc)
import Glibc
#endif
import Testing
@testable import Accounts
import Sodium

/// One real hash for the tests (hashing costs ~64 MiB and tens of ms).
let aliceHash: String = try! PasswordHash.hash("correct horse")

@Suite struct PasswordHashTests {
    @Test func roundTrip() throws {
        #expect(aliceHash.hasPrefix("$argon2id$v=19$m=65536,t=2,p=1$"))
        #expect(PasswordHash.verify("correct horse", against: aliceHash))
        #expect(!PasswordHash.verify("correct horse ", against: aliceHash))
        #expect(!PasswordHash.verify("", against: aliceHash))
        #expect(!PasswordHash.needsRehash(aliceHash))
        #expect(PasswordFile.hashProblem(aliceHash) == nil)
    }

    @Test func saltsDiffer() throws {
        let again = try PasswordHash.hash("correct horse")
        #expect(again != aliceHash)
        #expect(PasswordHash.verify("correct horse", against: again))
    }

    @Test func malformedHashesNeverMatch() {
        #expect(!PasswordHash.verify("x", against: ""))
        #expect(!PasswordHash.verify("x", against: "$argon2i$v=19$m=65536,t=2,p=1$AAAAAAAAAAAAAAAAAAAAAA$AAAA"))
        #expect(!PasswordHash.verify("correct horse", against: String(aliceHash.dropLast())))
        #expect(PasswordHash.needsRehash(aliceHash, opsLimit: 3, memLimit: PasswordHash.interactiveMemLimit))
    }

    @Test func nonASCIIPasswords() throws {
        let hash = try PasswordHash.hash("pässwörd")
        #expect(PasswordHash.verify("pässwörd", against: hash))
        #expect(!PasswordHash.verify("passwort", against: hash))
    }
}

@Suite struct PasswordFileParsingTests {
    func parse(_ text: String) throws(PasswordFileError) -> PasswordFile { try PasswordFile.parse(text, file: "users") }

    func error(_ text: String) -> PasswordFileError? {
        do { _ = try parse(text); return nil } catch { return error }
    }

    @Test func entriesCommentsAndSenders() throws {
        let text = "# accounts\n\nalice:\(aliceHash)\nbob@example.org:\(aliceHash):Bob@Example.org,@Lists.Example.org\n"
        let file = try parse(text)
        #expect(file.entries.count == 2)
        #expect(file.entries[0] == PasswordEntry(name: "alice", hash: aliceHash))
        #expect(file.entries[1].senders == ["bob@example.org", "@lists.example.org"])
        // Rewritten with the comments kept (senders normalised).
        #expect(file.render() == text.replacingOccurrences("Bob@Example.org,@Lists.Example.org", "bob@example.org,@lists.example.org"))
        #expect(try parse("").entries.isEmpty)
        #expect(try parse("alice:\(aliceHash)").entries.count == 1)   // no final LF
    }

    @Test func errorsNameTheLine() {
        #expect(error("alice:\(aliceHash)\nalice:\(aliceHash)\n")?.description == "users:2: duplicate user \"alice\" (first on line 1)")
        #expect(error("# x\nalice\n")?.description == "users:2: expected NAME:HASH or NAME:HASH:SENDERS, found 1 fields")
        #expect(error("alice:secret\n")?.line == 1)
        #expect(error("alice:secret\n")?.message.contains("not an Argon2id hash") == true)
        #expect(error("al ice:\(aliceHash)\n")?.description == "users:1: not a user name: \"al ice\"")
        #expect(error("-x:\(aliceHash)\n") != nil)
        #expect(error("a@b@c:\(aliceHash)\n") != nil)
        #expect(error("alice:\(aliceHash)\r\n")?.message == "line ends with CR (not a Unix text file)")
        #expect(error("alice:\(aliceHash):\n")?.message.contains("not a sender address") == true)
        #expect(error("alice:\(aliceHash):a@b.org,,c@d.org\n") != nil)
        #expect(error("alice:\(aliceHash):@-bad-\n") != nil)
        #expect(error("\n\nalice:\(aliceHash):x:y\n")?.line == 3)
    }

    @Test(arguments: [
        "$argon2id$v=16$m=65536,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g",
        "$argon2id$v=19$m=4194304,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g",
        "$argon2id$v=19$m=65536,t=0,p=1$c2FsdHNhbHRzYWx0c2FsdA$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g",
        "$argon2id$v=19$m=65536,t=2,p=4$c2FsdHNhbHRzYWx0c2FsdA$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g",
        "$argon2id$v=19$m=065536,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g",
        "$argon2id$v=19$t=2,m=65536,p=1$c2FsdHNhbHRzYWx0c2FsdA$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g",
        "$argon2id$v=19$m=65536,t=2,p=1$c2FsdA$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g",
        "$argon2id$v=19$m=65536,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA==$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g",
        "$argon2id$v=19$m=65536,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA$aGFz",
        "$argon2id$v=19$m=65536,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA",
        "$2y$10$abcdefghijklmnopqrstuu5s2v8.iXieOjg/.AySBTTZIIVFJeBui",
    ])
    func hashesRefused(_ hash: String) {
        #expect(PasswordFile.hashProblem(hash) != nil)
    }

    @Test func editing() throws {
        var file = try parse("# keep me\nalice:\(aliceHash)\nbob:\(aliceHash)\n")
        file.set(PasswordEntry(name: "carol", hash: aliceHash, senders: ["carol@example.org"]))
        file.set(PasswordEntry(name: "alice", hash: aliceHash, senders: ["@example.org"]))
        let removed = file.remove(named: "bob")
        let again = file.remove(named: "bob")
        #expect(removed)
        #expect(!again)
        #expect(file.render() == "# keep me\nalice:\(aliceHash):@example.org\ncarol:\(aliceHash):carol@example.org\n")
        #expect(try parse(file.render()) == file)
    }
}

/// A fresh directory under /tmp, removed at the end.
final class Scratch {
    let path: String
    init() {
        var template = Array("/tmp/sealpost-accounts-XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        precondition(made != nil)
        path = template.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
    }
    deinit {
        if let dir = opendir(path) {
            while let entry = readdir(dir) {
                let name = withUnsafeBytes(of: entry.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
                if name != "." && name != ".." { unlink(path + "/" + name) }
            }
            closedir(dir)
        }
        rmdir(path)
    }
    func mode(_ name: String) -> mode_t {
        var info = stat()
        precondition(stat(path + "/" + name, &info) == 0)
        return info.st_mode & 0o7777
    }
}

@Suite struct PasswordFileIOTests {
    @Test func writeIsAtomicPrivateAndReadable() throws {
        let dir = Scratch()
        let path = dir.path + "/users"
        var file = try PasswordFile.loadOrEmpty(path: path)
        #expect(file.entries.isEmpty)
        file.set(PasswordEntry(name: "alice", hash: aliceHash))
        try file.write(path: path)
        #expect(dir.mode("users") == 0o600)
        #expect(access(path + ".tmp", F_OK) != 0)
        let loaded = try PasswordFile.load(path: path)
        #expect(loaded == file)

        // An administrator's 0640 is kept; never widened to others.
        chmod(path, 0o644)
        #expect(throws: PasswordFileError.self) { try PasswordFile.load(path: path) }
        do {
            _ = try PasswordFile.load(path: path)
        } catch {
            #expect(error.description == "\(path): mode 0644 lets every user read the password hashes; run: chmod 600 \(path)")
        }
        try loaded.write(path: path)
        #expect(dir.mode("users") == 0o640)
        _ = try PasswordFile.load(path: path)
        chmod(path, 0o660)
        #expect(throws: PasswordFileError.self) { try PasswordFile.load(path: path) }
        #expect(try PasswordFile.load(path: path, requirePrivate: false) == file)
    }

    @Test func concurrentEditIsRefused() throws {
        let dir = Scratch()
        let path = dir.path + "/users"
        let fd = open(path + ".tmp", O_WRONLY | O_CREAT, 0o600)
        close(fd)
        var file = PasswordFile()
        file.set(PasswordEntry(name: "alice", hash: aliceHash))
        #expect(throws: PasswordFileError.self) { try file.write(path: path) }
        #expect(access(path, F_OK) != 0)
        // Under the CLI's lock a PATH.tmp can only be what a crash left.
        try file.write(path: path, holdingLock: true)
        #expect(try PasswordFile.load(path: path) == file)
        #expect(access(path + ".tmp", F_OK) != 0)
    }

    @Test func loadErrors() throws {
        let dir = Scratch()
        let path = dir.path + "/users"
        #expect(throws: PasswordFileError(file: path, message: "cannot open: No such file or directory")) {
            try PasswordFile.load(path: path)
        }
        let fd = open(path, O_WRONLY | O_CREAT, 0o600)
        let text = Array("alice:\(aliceHash)\nbob:x\n".utf8)
        _ = text.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        close(fd)
        #expect(throws: PasswordFileError.self) { try PasswordFile.load(path: path) }
        do { _ = try PasswordFile.load(path: path) } catch { #expect(error.line == 2) }
    }
}

@Suite struct AuthenticatorTests {
    let auth: Authenticator = {
        let file = try! PasswordFile.parse(
            "alice:\(aliceHash)\nbob@example.net:\(aliceHash)\ncarol:\(aliceHash):carol@example.org,@shared.example.org\n",
            file: "users")
        return Authenticator(file: file, localDomains: ["Example.ORG", "mail.example.org"])
    }()

    @Test func passwords() {
        #expect(auth.userCount == 3)
        #expect(auth.verify(username: "alice", password: "correct horse"))
        #expect(auth.verify(username: "alice", password: "correct horse", authorizationIdentity: "alice"))
        #expect(!auth.verify(username: "alice", password: "correct horse", authorizationIdentity: "carol"))
        #expect(!auth.verify(username: "alice", password: "Correct horse"))
        #expect(!auth.verify(username: "Alice", password: "correct horse"))
        #expect(!auth.verify(username: "mallory", password: "correct horse"))
    }

    @Test func senderOwnership() {
        #expect(auth.senders(of: "alice") == ["alice@example.org", "alice@mail.example.org"])
        #expect(auth.owns(user: "alice", sender: "alice@example.org"))
        #expect(auth.owns(user: "alice", sender: "ALICE@Mail.Example.Org"))
        #expect(!auth.owns(user: "alice", sender: "alice@example.net"))
        #expect(!auth.owns(user: "alice", sender: "bob@example.org"))
        #expect(auth.owns(user: "alice", sender: ""))
        #expect(auth.owns(user: "bob@example.net", sender: "bob@example.net"))
        #expect(!auth.owns(user: "bob@example.net", sender: "bob@example.org"))
        #expect(auth.owns(user: "carol", sender: "carol@example.org"))
        #expect(auth.owns(user: "carol", sender: "anyone@shared.example.org"))
        #expect(!auth.owns(user: "carol", sender: "anyone@sub.shared.example.org"))
        #expect(!auth.owns(user: "carol", sender: "carol@mail.example.org"))
        #expect(!auth.owns(user: "mallory", sender: "mallory@example.org"))
    }
}

extension String {
    func replacingOccurrences(_ a: String, _ b: String) -> String { replacing(a, with: b) }
}
