from services.runtime.settings import GrpcServiceSettings


class DispatcherSettings(GrpcServiceSettings):
    service_name: str = "dispatcher"
    accounts_addr: str = "127.0.0.1:50051"
    campaigns_addr: str = "127.0.0.1:50052"
