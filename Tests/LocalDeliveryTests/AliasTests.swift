import Foundation
import Testing
@testable import LocalDelivery

private let domains: Set<String> = ["localhost", "example.org"]

private func parse(_ text: String) throws(AliasError) -> AliasTable {
    try AliasTable.parse(text, file: "aliases", localDomains: domains)
}

private func parseError(_ text: String) -> AliasError? {
    do {
        _ = try parse(text)
        return nil
    } catch {
        return error
    }
}

@Suite struct AliasParsingTests {
    @Test func goodFileWithCommentsAndContinuations() throws {
        let table = try parse("""
            # system aliases
            Postmaster: root

            staff:  alice, Bob,
                    carol@Example.NET
            \t# a comment inside does not end the alias
            \tdave
            root:   root, admin@example.org
            list:   <eve@remote.test>
            """)
        #expect(table.entries.count == 4)
        #expect(table.targets(of: "postmaster") == [.name("root")])
        #expect(table.targets(of: "POSTMASTER") == [.name("root")])
        #expect(table.targets(of: "staff") == [.name("alice"), .name("bob"),
                                               .address(local: "carol", domain: "example.net"), .name("dave")])
        #expect(table.targets(of: "root") == [.name("root"), .address(local: "admin", domain: "example.org")])
        #expect(table.targets(of: "list") == [.address(local: "eve", domain: "remote.test")])
        #expect(table.entries["staff"]?.line == 4)
        #expect(table.targets(of: "nobody") == nil)
    }

    @Test func emptyAndCRLFFiles() throws {
        #expect(try parse("").isEmpty)
        #expect(try parse("# only a comment\n\n").isEmpty)
        #expect(try parse("a: b\r\nc: d\r\n").targets(of: "c") == [.name("d")])
    }

    @Test func badLinesNameTheirLine() throws {
        let cases: [(String, Int, String)] = [
            ("a: b\nno colon here\n", 2, "no \":\""),
            ("a: b\n: c\n", 2, "empty alias name"),
            ("  b\n", 1, "continuation line"),
            ("a:\nb: c\n", 1, "has no targets"),
            ("a: b\nc: d\nA: e\n", 3, "duplicate alias \"a\" (first defined at line 1)"),
            ("a b: c\n", 1, "white space"),
            ("a@b: c\n", 1, "contains \"@\""),
            ("a: b # trailing comment\n", 1, "comments must be on lines of their own"),
            ("a: b@\n", 1, "malformed address"),
            ("a: @b\n", 1, "malformed address"),
            ("a: b@c..d\n", 1, "malformed domain"),
            ("a: b\nc: \"quoted target\"\n", 2, "quoted targets are not supported"),
            ("a: b(c)\n", 1, "invalid character"),
        ]
        for (text, line, fragment) in cases {
            let error = try #require(parseError(text), "expected an error for \(text.debugDescription)")
            #expect(error.line == line, "\(text.debugDescription): \(error)")
            #expect(error.message.contains(fragment), "\(text.debugDescription): \(error)")
            #expect(error.description.hasPrefix("aliases:\(line): "))
        }
    }

    @Test func commandFileAndIncludeTargetsAreRefused() throws {
        let pipe = try #require(parseError("a: b\nbackup: |/usr/bin/archive\n"))
        #expect(pipe.line == 2)
        #expect(pipe.message.contains("not supported"))
        #expect(pipe.message.contains("programs"))
        let quotedPipe = try #require(parseError("x: \"|/bin/sh -c evil\"\n"))
        #expect(quotedPipe.message.contains("not supported"))
        let file = try #require(parseError("log: alice, /var/log/mail.copy\n"))
        #expect(file.message.contains("file targets"))
        #expect(file.message.contains("not supported"))
        let include = try #require(parseError("l: :include:/etc/list\n"))
        #expect(include.message.contains(":include:"))
    }

    @Test func loopsAreFoundAtLoadTime() throws {
        #expect(try #require(parseError("root: root, ops\nops: root\n")).message == "alias loop: ops -> root -> ops")
        let direct = try #require(parseError("a: b\nb: a\n"))
        #expect(direct.message == "alias loop: a -> b -> a")
        #expect(direct.line == 1)
        let longer = try #require(parseError("x: alice\nc: d\nd: e\ne: C\n"))
        #expect(longer.message == "alias loop: c -> d -> e -> c")
        #expect(longer.line == 2)
        // Through an address in a local domain.
        let viaAddress = try #require(parseError("a: b@example.org\nb: a@LOCALHOST\n"))
        #expect(viaAddress.message.contains("alias loop"))
        // Not a loop: an alias naming itself is that user; remote addresses are not followed.
        #expect(throws: Never.self) { try parse("root: root, ops@remote.test\nops: root\n") }
        #expect(throws: Never.self) { try parse("a: b@remote.test\nb: a@remote.test\n") }
    }

    @Test func depthIsLimited() throws {
        func chain(_ n: Int) -> String {
            (0..<n).map { "a\($0): a\($0 + 1)\n" }.joined()
        }
        #expect(throws: Never.self) { try parse(chain(AliasTable.maximumDepth)) }
        let error = try #require(parseError(chain(AliasTable.maximumDepth + 1)))
        #expect(error.message.contains("deeper than \(AliasTable.maximumDepth)"))
        #expect(error.line == 1)
    }

    @Test func missingFileIsEmptyUnreadableIsAnError() throws {
        let dir = TemporaryDirectory()
        #expect(try AliasTable.load(path: dir.file("absent"), localDomains: domains).isEmpty)
        try dir.write("aliases", "a: b\nbad line\n")
        #expect {
            try AliasTable.load(path: dir.file("aliases"), localDomains: domains)
        } throws: { error in
            (error as? AliasError)?.description == "\(dir.file("aliases")):2: expected \"name: target, ...\", found no \":\""
        }
        // A directory cannot be read as a file.
        #expect(throws: AliasError.self) {
            try AliasTable.load(path: dir.path, localDomains: domains)
        }
    }
}

@Suite struct ResolutionTests {
    let resolver: RecipientResolver

    init() throws {
        let aliases = try AliasTable.parse("""
            postmaster: root
            root: root, ops@remote.test
            staff: alice, bob
            team: staff, carol@example.org, dave@remote.test
            owner-list+x: carol
            selfloop: selfloop
            ghost: nobody
            """, file: "aliases", localDomains: ["localhost", "example.org"])
        resolver = RecipientResolver(users: LocalUsers(names: ["root", "alice", "Bob", "carol"]),
                                     aliases: aliases, localDomains: ["localhost", "example.org"])
    }

    @Test func theRecipientTableHoldsTheUsersAndTheAliases() throws {
        let table = resolver.recipientTable
        #expect(table.names == ["root", "alice", "bob", "carol", "postmaster", "staff", "team", "owner-list+x", "selfloop", "ghost"])
        // Whatever resolves is accepted at RCPT; an unknown name is not.
        for local in ["alice", "BOB", "alice+lists", "staff+x", "owner-list+x", "team", "postmaster", "root+x"] {
            #expect(!(try resolver.resolve("\(local)@localhost")).isEmpty)
            #expect(table.accepts(localPart: local), "\(local)")
        }
        for local in ["dave", "+alice", "owner-list", "nobody"] {
            #expect(throws: DeliveryError.self) { try resolver.resolve("\(local)@localhost") }
            #expect(!table.accepts(localPart: local), "\(local)")
        }
    }

    @Test func aPostmasterWithoutMailboxIsWarnedAbout() throws {
        #expect(LocalDeliveryService.postmasterWarning(resolver, aliasesFile: "/etc/aliases") == nil)
        let bare = RecipientResolver(users: LocalUsers(names: ["alice"]), aliases: AliasTable(), localDomains: ["localhost"])
        #expect(LocalDeliveryService.postmasterWarning(bare, aliasesFile: "/etc/aliases")
                == "mail to postmaster is accepted but cannot be delivered (unknown user: \"postmaster\"): add a line \"postmaster: USER\" to /etc/aliases")
        // root stands in for a missing postmaster.
        let root = RecipientResolver(users: LocalUsers(names: ["root"]), aliases: AliasTable(), localDomains: ["localhost"])
        #expect(LocalDeliveryService.postmasterWarning(root, aliasesFile: "/etc/aliases") == nil)
    }

    @Test func user() throws {
        #expect(try resolver.resolve("alice@localhost") == [.mailbox(user: "alice", address: "alice@localhost")])
        // Case-insensitive lookups; the mailbox keeps the account's spelling.
        #expect(try resolver.resolve("BOB@LocalHost") == [.mailbox(user: "Bob", address: "bob@localhost")])
    }

    @Test func plusExtensionDeliversToTheUser() throws {
        #expect(try resolver.resolve("alice+lists@example.org")
                == [.mailbox(user: "alice", address: "alice+lists@example.org")])
        #expect(try resolver.resolve("staff+x@localhost").count == 2)
        // An exact alias with the extension wins.
        #expect(try resolver.resolve("owner-list+x@localhost") == [.mailbox(user: "carol", address: "carol@localhost")])
        #expect(throws: DeliveryError.unknownUser("+alice")) { try resolver.resolve("+alice@localhost") }
    }

    @Test func aliasAndAliasToAlias() throws {
        #expect(try resolver.resolve("postmaster@localhost") == [
            .mailbox(user: "root", address: "root@localhost"),
            .forward(address: "ops@remote.test"),
        ])
        #expect(try resolver.resolve("team@localhost") == [
            .mailbox(user: "alice", address: "alice@localhost"),
            .mailbox(user: "Bob", address: "bob@localhost"),
            .mailbox(user: "carol", address: "carol@example.org"),
            .forward(address: "dave@remote.test"),
        ])
    }

    @Test func anAtSignFollowedByACombiningMarkStillSplitsTheAddress() throws {
        // One Character "@\u{301}", the byte "@" all the same: the domain is
        // "\u{301}localhost", not a local one (before, the whole address was
        // taken for a local part of the default domain).
        #expect(throws: DeliveryError(status: "5.1.2", text: "domain \"\u{301}localhost\" is not a local domain")) {
            try resolver.resolve("alice@\u{301}localhost")
        }
    }

    @Test func remoteForwardTarget() throws {
        #expect(try resolver.resolve("root@example.org").contains(.forward(address: "ops@remote.test")))
    }

    @Test func unknownUsers() throws {
        #expect(throws: DeliveryError(status: "5.1.1", text: "unknown user: \"Zed\"")) {
            try resolver.resolve("Zed@localhost")
        }
        #expect(throws: DeliveryError.unknownUser("nobody")) { try resolver.resolve("ghost@localhost") }
        #expect(throws: DeliveryError.unknownUser("selfloop")) { try resolver.resolve("selfloop@localhost") }
    }

    @Test func nonLocalDomainIsRefused() throws {
        #expect {
            try resolver.resolve("alice@remote.test")
        } throws: { error in
            (error as? DeliveryError)?.status == "5.1.2"
        }
    }

    @Test func addressWithoutDomainUsesTheDefaultDomain() throws {
        #expect(try resolver.resolve("alice") == [.mailbox(user: "alice", address: "alice@example.org")])
    }

    @Test func postmasterFallsBackToRoot() throws {
        let r = RecipientResolver(users: LocalUsers(names: ["root"]), aliases: AliasTable(), localDomains: ["localhost"])
        #expect(try r.resolve("PostMaster@localhost") == [.mailbox(user: "root", address: "root@localhost")])
        let none = RecipientResolver(users: LocalUsers(names: ["alice"]), aliases: AliasTable(), localDomains: ["localhost"])
        #expect(throws: DeliveryError.unknownUser("postmaster")) { try none.resolve("postmaster@localhost") }
    }

    @Test func runtimeLoopAndDepthChecksBackUpTheLoader() throws {
        // An extension reaches an alias the loader does not follow: "a: b+x", "b: a".
        let aliases = try AliasTable.parse("a: b+x\nb: a\n", file: "aliases", localDomains: ["localhost"])
        let r = RecipientResolver(users: LocalUsers(names: []), aliases: aliases, localDomains: ["localhost"])
        #expect {
            try r.resolve("a@localhost")
        } throws: { error in
            let e = error as? DeliveryError
            return e?.status == "5.4.6" && e?.text == "alias loop: a -> b -> a"
        }
        var shallow = r
        shallow.maximumDepth = 1
        #expect {
            try shallow.resolve("a@localhost")
        } throws: { error in
            (error as? DeliveryError)?.text.contains("deeper than 1") == true
        }
    }

    @Test func oneCopyPerMailbox() throws {
        let aliases = try AliasTable.parse("both: alice, alice+x, ALICE@localhost\n", file: "aliases", localDomains: ["localhost"])
        let r = RecipientResolver(users: LocalUsers(names: ["alice"]), aliases: aliases, localDomains: ["localhost"])
        #expect(try r.resolve("both@localhost") == [.mailbox(user: "alice", address: "alice@localhost")])
    }

    @Test func systemAccountsIncludeRoot() throws {
        let names = try LocalUsers.systemAccountNames()
        #expect(names.contains("root"))
        // Every account of /etc/passwd (nsswitch.conf's "files"), to the
        // last: the loop stops at the end, not before.
        if let passwd = try? String(contentsOfFile: "/etc/passwd", encoding: .utf8) {
            let listed = passwd.split(separator: "\n").compactMap { $0.split(separator: ":").first.map(String.init) }
                .filter { !$0.hasPrefix("+") && !$0.hasPrefix("-") && !$0.hasPrefix("#") }
            #expect(Set(listed).isSubset(of: Set(names)), "\(Set(listed).subtracting(names))")
        }
        let users = LocalUsers(names: ["ok", "../evil", ".hidden", "a/b", ""])
        #expect(users.count == 1)
    }
}

/// What a review found: an alias with one stale member, aliases reached by
/// many paths, huge aliases, long chains, accounts differing in case.
@Suite struct AliasExpansionBoundsTests {
    private func resolver(_ aliases: String, users: [String] = ["alice", "bob"]) throws -> RecipientResolver {
        RecipientResolver(users: LocalUsers(names: users), aliases: try parse(aliases), localDomains: domains)
    }

    /// carol's account is gone: alice and bob still get theirs (Postfix
    /// bounces only the member); with nobody left, the recipient is unknown.
    @Test func anUnknownMemberIsLeftOutNotTheWholeAlias() throws {
        let r = try resolver("staff: alice, carol, team\nteam: bob, dave\ngone: carol, dave\n")
        let staff = try r.resolution("staff@localhost")
        #expect(staff.destinations == [.mailbox(user: "alice", address: "alice@localhost"),
                                       .mailbox(user: "bob", address: "bob@localhost")])
        #expect(staff.skipped == ["staff -> carol", "staff -> team -> dave"])
        #expect(throws: DeliveryError.unknownUser("carol")) { try r.resolve("gone@localhost") }
        #expect(throws: DeliveryError.unknownUser("zed")) { try r.resolve("zed@localhost") }
    }

    /// Sixteen levels of aliases, each naming the four of the next: 4^15
    /// paths to the last level, which was expanded once per path. Each
    /// alias is expanded once now; the mailboxes come once each.
    @Test func anAliasReachedByManyPathsIsExpandedOnce() throws {
        var lines: [String] = []
        for level in 0..<15 {
            for i in 0..<4 {
                lines.append("l\(level)x\(i): " + (0..<4).map { "l\(level + 1)x\($0)" }.joined(separator: ", "))
            }
        }
        for i in 0..<4 { lines.append("l15x\(i): alice, bob") }
        let r = try resolver(lines.joined(separator: "\n") + "\n")
        #expect(try r.resolve("l0x0@localhost") == [.mailbox(user: "alice", address: "alice@localhost"),
                                                   .mailbox(user: "bob", address: "bob@localhost")])
    }

    /// More than 1000 destinations: the administrator's to fix, so the mail
    /// waits (4.3.0) rather than bounce; 1000 go.
    @Test func anAliasPastTheDestinationLimitDefers() throws {
        let users = (0...RecipientResolver.destinationLimit).map { "u\($0)" }
        let all = "all: " + users.joined(separator: ", ") + "\n"
        let most = "most: " + users.dropLast().joined(separator: ", ") + "\n"
        let r = try resolver(all + most, users: users)
        #expect(try r.resolve("most@localhost").count == RecipientResolver.destinationLimit)
        #expect {
            try r.resolve("all@localhost")
        } throws: { error in
            (error as? DeliveryError).map { $0.isTemporary && $0.text.contains("exceeds 1000 destinations") } == true
        }
    }

    /// A chain of 20,000 aliases: the loader's depth error, naming where the
    /// chain starts, not a stack overflow.
    @Test func aVeryLongChainIsADepthErrorNotACrash() throws {
        let n = 20_000
        let text = (0..<n).map { "a\($0): a\($0 + 1)" }.joined(separator: "\n") + "\na\(n): alice\n"
        let error = try #require(parseError(text))
        #expect(error.message.contains("nested deeper than \(AliasTable.maximumDepth) levels"), "\(error)")
    }

    /// Lookups fold case; of two accounts differing only in case, the
    /// lower-case one gets the mail, whichever the user database lists first.
    @Test func ofTwoAccountsDifferingInCaseTheLowerCaseOneGetsTheMail() {
        #expect(LocalUsers(names: ["Alice", "alice"]).lookup("ALICE") == "alice")
        #expect(LocalUsers(names: ["alice", "Alice"]).lookup("Alice") == "alice")
        #expect(LocalUsers(names: ["Carol"]).lookup("carol") == "Carol")
    }
}
