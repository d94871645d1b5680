// swift-tools-version:6.0
//
// Sealpost: a privilege-separated mail transfer agent.
// One executable per pipeline stage (thin mains); the logic lives in the
// libraries, which are tested without processes. Each C library is wrapped
// once, in one module, behind a system-library target with its own shims.

import PackageDescription

// In release builds every stage links the Swift runtime and Foundation
// statically. queue-inject first, which runs once per message (it is also
// `sendmail`), so start-up is most of its cost: the dynamic loader then maps
// no ~15 Swift libraries nor resolves their symbols, which halved its CPU
// time per message (bench/inject). Then the long-running stages: calls into
// the runtime (retain, release, allocation: a tenth of smtp-listen's
// instructions) go straight to it instead of through the PLT, and the
// runtime's protocol-conformance lookups (every dynamic cast, NIOAny's
// among them) search the conformances of one image instead of fifteen:
// bench/smtp --sink hold, against the same code linked dynamically, 1.112x
// messages per second with 16% less CPU per message (median of 6
// interleaved rounds; SwiftPM's --static-swift-stdlib gave 1.101x and
// 1.132x). Only the link changes: the objects are compiled as for a
// dynamic link, against the dynamic Foundation, whose autolink entries
// name only libFoundation, so its static archive's own dependencies are
// listed here (those of Swift 6.3's toolchain). Each stage then carries its
// own copy of the runtime (binaries of 76-96 MB with debug information) and
// the processes share those pages no more: the default pipeline's six
// processes, RSS 144.7 -> 111.0 MiB, PSS 56.6 -> 91.6 MiB. The runtime
// looks for its crash backtracer next to libswiftCore.so: Pipeline/start
// names the toolchain's (SWIFT_BACKTRACE) for the stages.
let staticSwiftRuntime: [LinkerSetting] = [
    .unsafeFlags([
        "-static-stdlib",
        "-lFoundationInternationalization", "-lFoundationEssentials", "-lCoreFoundation",
        "-l_FoundationICU", "-l_FoundationCShims", "-l_FoundationCollections",
        "-lswiftSynchronization", "-lswiftDispatch",
    ], .when(platforms: [.linux], configuration: .release)),
]

let package = Package(
    name: "Sealpost",
    platforms: [.macOS(.v13)],
    products: [
        .executable(name: "queue", targets: ["queue"]),
        .executable(name: "queue-inject", targets: ["queue-inject"]),
        .executable(name: "local-deliver", targets: ["local-deliver"]),
        .executable(name: "remote-deliver", targets: ["remote-deliver"]),
        .executable(name: "sealpost", targets: ["sealpost"]),
        .executable(name: "supervise", targets: ["supervise"]),
        .executable(name: "smtp-listen", targets: ["smtp-listen"]),
        .executable(name: "crypto-negotiate", targets: ["crypto-negotiate"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/LebJe/TOMLKit.git", from: "0.6.0"),
    ],
    targets: [
        // C libraries: one system-library target each, shims in one header.
        .systemLibrary(name: "COpenSSL", pkgConfig: "openssl",
                       providers: [.apt(["libssl-dev"])]),
        .systemLibrary(name: "CSodium", pkgConfig: "libsodium",
                       providers: [.apt(["libsodium-dev"])]),
        .systemLibrary(name: "CLMDB", pkgConfig: "lmdb",
                       providers: [.apt(["liblmdb-dev"])]),
        // libunbound's pkg-config file requires libevent's: install libevent-dev too.
        .systemLibrary(name: "CUnbound", pkgConfig: "libunbound",
                       providers: [.apt(["libunbound-dev", "libevent-dev"])]),
        // Glibc calls and macros Swift cannot reach (CMSG_*, WIFEXITED, pipe2,
        // posix_spawn closefrom, stderr); GNU-only calls live in the .c file.
        .target(name: "CSystemShims"),
        // posix_spawn with placed descriptors, wait statuses, signalfd: the
        // supervisor's own C, apart so that it needs no umbrella-header edit.
        .target(name: "CSystemSpawn"),

        // Wrappers, one per C library.
        .target(name: "LMDB", dependencies: ["CLMDB"]),
        .target(name: "Sodium", dependencies: ["CSodium"]),
        .target(name: "TLS", dependencies: ["COpenSSL", "CSystemShims", "FileAccess"]),
        .target(name: "DNS", dependencies: ["CUnbound", "SealpostConfig"]),

        // Reading a small file whole, replacing one atomically.
        .target(name: "FileAccess"),

        // Libraries holding the logic.
        .target(name: "StageProtocol", dependencies: ["CSystemShims", "FileAccess"]),
        // The NIO codec apart, so that the blocking clients (queue-inject,
        // run once per message) do not link NIOCore.
        .target(name: "StageProtocolNIO", dependencies: [
            "StageProtocol",
            .product(name: "NIOCore", package: "swift-nio"),
        ]),
        .target(name: "SealpostConfig", dependencies: [
            "FileAccess",
            .product(name: "TOMLKit", package: "TOMLKit"),
        ]),
        .target(name: "StageRuntime", dependencies: [
            "CSystemShims", "SealpostConfig",
            .product(name: "Logging", package: "swift-log"),
        ]),
        .target(name: "MailMessage"),
        .target(name: "SMTP"),
        // The inject frames of an SMTP message, and `sendmail -bs` on
        // them: shared by smtp-listen and queue-inject, without NIO.
        .target(name: "SMTPInjection", dependencies: ["SMTP", "StageProtocol", "MailMessage", "SealpostConfig"]),
        // The SMTP AUTH password file and sender ownership (smtp-listen, sealpost user).
        .target(name: "Accounts", dependencies: ["Sodium", "SealpostConfig", "FileAccess", "MailMessage"]),
        .target(name: "Spool", dependencies: ["LMDB", "Sodium", "StageProtocol", "CSystemShims", "FileAccess"]),
        .target(name: "QueueService", dependencies: [
            "Spool", "CSystemShims", "StageProtocol", "StageProtocolNIO", "StageRuntime", "MailMessage", "SealpostConfig",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        .target(name: "LocalDelivery", dependencies: [
            "StageProtocol", "StageRuntime", "MailMessage", "SealpostConfig", "FileAccess",
            .product(name: "Logging", package: "swift-log"),
        ]),
        .target(name: "SMTPService", dependencies: [
            "SMTP", "SMTPInjection", "StageProtocol", "StageProtocolNIO", "StageRuntime", "MailMessage", "SealpostConfig", "CSystemShims", "Accounts", "DNS",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        .target(name: "RemoteDelivery", dependencies: [
            "SMTP", "DNS", "MailMessage", "StageProtocol", "StageProtocolNIO", "StageRuntime", "SealpostConfig", "FileAccess",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        .target(name: "CryptoNegotiation", dependencies: [
            "TLS", "StageProtocol", "StageRuntime", "SealpostConfig", "CSystemShims",
            .product(name: "TOMLKit", package: "TOMLKit"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        .target(name: "Supervision", dependencies: [
            "CSystemShims", "CSystemSpawn", "StageRuntime", "SealpostConfig", "StageProtocol", "FileAccess",
        ]),

        // Stages: thin mains.
        .executableTarget(name: "queue", dependencies: [
            "QueueService", "StageRuntime", "SealpostConfig",
        ], linkerSettings: staticSwiftRuntime),
        .executableTarget(name: "queue-inject", dependencies: [
            "StageProtocol", "MailMessage", "SealpostConfig", "SMTPInjection",
        ], linkerSettings: staticSwiftRuntime),
        .executableTarget(name: "local-deliver", dependencies: [
            "LocalDelivery", "StageRuntime", "SealpostConfig",
        ], linkerSettings: staticSwiftRuntime),
        .executableTarget(name: "remote-deliver", dependencies: [
            "RemoteDelivery", "StageRuntime", "SealpostConfig",
            .product(name: "Logging", package: "swift-log"),
        ], linkerSettings: staticSwiftRuntime),
        .executableTarget(name: "sealpost", dependencies: [
            "StageProtocol", "StageRuntime", "SealpostConfig", "Accounts", "Sodium",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ], linkerSettings: staticSwiftRuntime),
        .executableTarget(name: "smtp-listen", dependencies: [
            "SMTPService", "DNS", "StageRuntime", "SealpostConfig",
        ], linkerSettings: staticSwiftRuntime),
        .executableTarget(name: "crypto-negotiate", dependencies: [
            "CryptoNegotiation", "StageRuntime", "SealpostConfig",
        ], linkerSettings: staticSwiftRuntime),
        .executableTarget(name: "supervise", dependencies: [
            "Supervision", "StageRuntime", "SealpostConfig",
        ], linkerSettings: staticSwiftRuntime),

        // Tests.
        .testTarget(name: "StageProtocolTests", dependencies: [
            "StageProtocol", "StageProtocolNIO", "CSystemShims",
            .product(name: "NIOEmbedded", package: "swift-nio"),
        ]),
        .testTarget(name: "SpoolTests", dependencies: ["Spool", "LMDB", "Sodium"]),
        .testTarget(name: "SealpostConfigTests", dependencies: ["SealpostConfig"]),
        .testTarget(name: "StageRuntimeTests", dependencies: [
            "StageRuntime", "SealpostConfig", .product(name: "Logging", package: "swift-log"),
        ]),
        .testTarget(name: "MailMessageTests", dependencies: ["MailMessage"]),
        .testTarget(name: "QueueServiceTests", dependencies: ["QueueService", "Spool", "LMDB"]),
        .testTarget(name: "LocalDeliveryTests", dependencies: ["LocalDelivery", "StageProtocol", "SealpostConfig", "CSystemShims"]),
        .testTarget(name: "SMTPTests", dependencies: ["SMTP"]),
        .testTarget(name: "FileAccessTests", dependencies: ["FileAccess"]),
        .testTarget(name: "AccountsTests", dependencies: ["Accounts", "Sodium"]),
        // QueueService and Spool: the real queue, for its idle timeout on
        // smtp-listen's pooled inject connections.
        .testTarget(name: "SMTPServiceTests", dependencies: [
            "SMTPService", "SMTP", "SMTPInjection", "StageProtocol", "CSystemShims", "Accounts", "Sodium", "DNS", "QueueService", "Spool",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "NIOPosix", package: "swift-nio"),
        ]),
        .testTarget(name: "RemoteDeliveryTests", dependencies: [
            "RemoteDelivery", "SMTP", "DNS", "DNSTestbed", "CryptoNegotiation", "TLS", "StageProtocol", "SealpostConfig", "CSystemShims",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
        ]),
        .testTarget(name: "DNSTests", dependencies: ["DNS", "DNSTestbed"]),
        .testTarget(name: "PipelineTests", dependencies: ["StageProtocol"], exclude: ["Fixtures"]),
        .testTarget(name: "SupervisionTests", dependencies: ["Supervision", "SealpostConfig", "StageProtocol", "CSystemShims", "FileAccess"]),
        .testTarget(name: "TLSTests", dependencies: ["TLS", "TLSTestSupport", "CSystemShims"]),
        .testTarget(name: "CryptoNegotiationTests", dependencies: [
            "CryptoNegotiation", "TLS", "TLSTestSupport", "StageProtocol", "CSystemShims",
        ]),
        // Support shared by test targets (a test target cannot import another).
        .target(name: "TLSTestSupport", dependencies: ["TLS", "CSystemShims"], path: "Tests/Support/TLSTestSupport"),
        .target(name: "DNSTestbed", dependencies: ["DNS"], path: "Tests/Support/DNSTestbed"),
    ],
    swiftLanguageModes: [.v6]
)
